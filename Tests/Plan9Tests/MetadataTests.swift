import CPlan9
import Foundation
import NIOCore
import Testing

@testable import Plan9

@Suite("Metadata mode")
struct MetadataTests {
    @Test func chownAndChmodPersistInXattrs() async throws {
        let fx = try Fixture(metadata: true) { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let hostBefore = try lstatOf(fx.share + "/f")
        do {
            let c = try await fx.connect()
            try await c.walk(0, 1, ["f"])
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid, uid: 1234, gid: 5678))
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.mode, mode: 0o4750))
            let a = try await c.getattr(1)
            #expect(a.uid == 1234 && a.gid == 5678)
            #expect(a.mode == 0o104750)
            await c.close()
        }
        // A new session sees the same; the host file keeps its owner and gets no setuid bit.
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        let a = try await c.getattr(1)
        #expect(a.uid == 1234 && a.gid == 5678 && a.mode == 0o104750)
        let host = try lstatOf(fx.share + "/f")
        #expect(host.st_uid == hostBefore.st_uid)
        #expect(host.st_mode & 0o7000 == 0)
        // The guest cannot read or forge the metadata xattr.
        await #expect(throws: P9Errno(EOPNOTSUPP)) {
            try await c.call(.txattrwalk(fid: 1, newfid: 2, name: P9String(GuestMetadata.xattrName)))
        }
        guard case .rxattrwalk = try await c.call(.txattrwalk(fid: 1, newfid: 2, name: "")) else { Issue.record("list"); return }
        #expect(try await c.read(2).isEmpty)
    }

    /// Tuvmsetattr answers with what the change left, as a Tgetattr after it would: the set-id
    /// bits a chown cleared and the new ctime included.
    @Test func setattrThatAnswersWithTheAttributes() async throws {
        let fx = try Fixture(metadata: true) { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.mode, mode: 0o6755))
        let before = try await c.getattr(1)
        try await Task.sleep(for: .milliseconds(20))
        let reply = try await c.call(.tuvmsetattr(fid: 1, attr: P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid
                                                                            | P9.SetattrMask.mode, mode: 0o6755 & ~0o6000 | 0o100000,
                                                                          uid: 1234, gid: 5678)))
        guard case .ruvmsetattr(let a) = reply else { Issue.record("\(reply)"); return }
        #expect(a.uid == 1234 && a.gid == 5678 && a.mode == 0o100755)
        #expect(a == (try await c.getattr(1)))
        #expect((a.ctimeSec, a.ctimeNsec) > (before.ctimeSec, before.ctimeNsec))
        // An error is the setattr's, as with Tsetattr.
        await #expect(throws: P9Errno(EBADF)) {
            try await c.call(.tuvmsetattr(fid: 9, attr: P9SetAttr(valid: P9.SetattrMask.size, size: 0)))
        }
        await c.close()
    }

    /// Tuvmlcreate leaves the directory's fid as it was, opens the new file as one fid, binds
    /// another to it unopened, and answers with the attributes a Tgetattr on either gives, and
    /// with the directory's.
    /// A failure (a taken fid, an existing name with O_EXCL) leaves no new fid behind.
    @Test func createThatBindsAFidAndAnswersWithTheAttributes() async throws {
        let fx = try Fixture(metadata: true) { share, _ in try write(share + "/old", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect(attach: false)
        try await c.attach(fid: 0, uname: "user", nUname: 1000)
        let excl = UInt32(O_RDWR | O_CREAT | O_EXCL)
        let reply = try await c.call(.tuvmlcreate(dfid: 0, ofid: 1, pfid: 2, name: "new", flags: excl, mode: 0o640, gid: 100))
        guard case let .ruvmlcreate(_, a, dir) = reply else { Issue.record("\(reply)"); return }
        #expect(a.mode == 0o100640 && a.uid == 1000 && a.gid == 100 && a.size == 0)
        #expect(a == (try await c.getattr(2)))
        // The directory's attributes are those after the create.
        #expect(dir == (try await c.getattr(0)))
        #expect((dir.mtimeSec, dir.mtimeNsec) >= (a.mtimeSec, a.mtimeNsec))
        #expect(a.qid == (try await c.getattr(1)).qid)
        // ofid is open for writing, pfid is not open, and dfid is still the directory.
        #expect(try await c.call(.twrite(fid: 1, offset: 0, data: ByteBuffer(bytes: Array("hello".utf8)))) == .rwrite(count: 5))
        #expect(try String(contentsOfFile: fx.share + "/new", encoding: .utf8) == "hello")
        await #expect(throws: P9Errno.self) { try await c.call(.twrite(fid: 2, offset: 0, data: ByteBuffer(bytes: [1]))) }
        try await c.walk(0, 3, ["old"])
        #expect((try await c.getattr(0)).qid.type & 0x80 != 0)
        // Failures: an existing name under O_EXCL, a taken fid, ofid == pfid; none leaves a fid.
        await #expect(throws: P9Errno(EEXIST)) {
            try await c.call(.tuvmlcreate(dfid: 0, ofid: 4, pfid: 5, name: "old", flags: excl, mode: 0o600, gid: 100))
        }
        await #expect(throws: P9Errno(EBADF)) {
            try await c.call(.tuvmlcreate(dfid: 0, ofid: 4, pfid: 3, name: "other", flags: excl, mode: 0o600, gid: 100))
        }
        await #expect(throws: P9Errno(EBADF)) {
            try await c.call(.tuvmlcreate(dfid: 0, ofid: 4, pfid: 4, name: "other", flags: excl, mode: 0o600, gid: 100))
        }
        #expect(!FileManager.default.fileExists(atPath: fx.share + "/other"))
        for fid: UInt32 in [4, 5] {
            await #expect(throws: P9Errno(EBADF)) { try await c.getattr(fid) }
        }
        await c.close()
    }

    /// Tuvmclunk: the guest gives fids back many to a request. Every fid listed is clunked,
    /// whatever the others; an unknown one makes the answer an error, after the rest are gone.
    @Test func clunkingManyFidsInOneRequest() async throws {
        let fx = try Fixture(metadata: false) { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect(attach: false)
        try await c.attach(fid: 0, uname: "user", nUname: 1000)
        for fid: UInt32 in 1...4 { try await c.walk(0, fid, ["f"]) }
        #expect(try await c.call(.tuvmclunk(fids: [1, 2])) == .ruvmclunk)
        await #expect(throws: P9Errno(EBADF)) { try await c.call(.tuvmclunk(fids: [3, 99, 4])) }
        for fid: UInt32 in 1...4 {
            await #expect(throws: P9Errno(EBADF)) { try await c.getattr(fid) }
        }
        #expect(try await c.call(.tuvmclunk(fids: [])) == .ruvmclunk)
        // The fids are free again, and the directory's fid was never touched.
        try await c.walk(0, 1, ["f"])
        #expect((try await c.getattr(0)).qid.type & 0x80 != 0)
        await c.close()
    }

    @Test func createdFilesCarryTheGuestOwner() async throws {
        let fx = try Fixture(metadata: true)
        defer { Task { await fx.close() } }
        let c = try await fx.connect(attach: false)
        try await c.attach(fid: 0, uname: "user", nUname: 1000)
        try await c.walk(0, 1, [])
        try await c.lcreate(1, "mine", mode: 0o600, gid: 100)
        try await c.mkdir(0, "d", mode: 0o700)
        try await c.walk(0, 2, ["mine"])
        let a = try await c.getattr(2)
        #expect(a.uid == 1000 && a.gid == 100 && a.mode == 0o100600)
        try await c.walk(0, 3, ["d"])
        let d = try await c.getattr(3)
        #expect(d.uid == 1000 && d.mode == 0o40700)
        #expect(try lstatOf(fx.share + "/mine").st_uid == geteuid())
    }

    @Test func specialFilesAreEmulated() async throws {
        let fx = try Fixture(metadata: true)
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.call(.tmknod(dfid: 0, name: "sda", mode: 0o60660, major: 8, minor: 1, gid: 6))
        try await c.call(.tmknod(dfid: 0, name: "pipe", mode: 0o10644, major: 0, minor: 0, gid: 0))
        try await c.call(.tmknod(dfid: 0, name: "sock", mode: 0o140755, major: 0, minor: 0, gid: 0))
        // On the host: plain regular files.
        for n in ["sda", "pipe", "sock"] {
            #expect(try lstatOf(fx.share + "/" + n).st_mode & S_IFMT == S_IFREG)
        }
        try await c.walk(0, 1, ["sda"])
        let a = try await c.getattr(1)
        #expect(a.mode == 0o60660)
        #expect(a.rdev == UInt64(cp9_makedev(8, 1)))
        #expect(a.gid == 6)
        try await c.walk(0, 2, ["pipe"])
        #expect(try await c.getattr(2).mode == 0o10644)
    }

    /// As Linux does on write (killpriv): setuid goes, and setgid when group execute makes it mean
    /// setgid rather than mandatory locking, unless the writer is root (CAP_FSETID).
    @Test func writeByAnotherUserClearsSetuidAndSetgid() async throws {
        let fx = try Fixture(metadata: true) { share, _ in
            try write(share + "/tool", "x")
            try write(share + "/locked", "x")
        }
        defer { Task { await fx.close() } }
        let root = try await fx.connect()
        for (fid, name, mode) in [(UInt32(1), "tool", UInt32(0o6755)), (2, "locked", 0o2644)] {
            try await root.walk(0, fid, [name])
            try await root.setattr(fid, P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid, uid: 1000, gid: 1000))
            try await root.setattr(fid, P9SetAttr(valid: P9.SetattrMask.mode, mode: mode))
        }
        try await root.walk(0, 3, ["tool"])
        try await root.lopen(3, P9.OpenFlags.wronly)
        try await root.write(3, Array("root".utf8))
        #expect(try await root.getattr(1).mode == 0o106755)

        let user = try await fx.connect(attach: false)
        try await user.attach(fid: 0, uname: "other", nUname: 2000)
        for (fid, name) in [(UInt32(1), "tool"), (2, "locked")] {
            try await user.walk(0, fid, [name])
            try await user.lopen(fid, P9.OpenFlags.wronly)
            try await user.write(fid, Array("user".utf8))
        }
        #expect(try await root.getattr(1).mode == 0o100755)
        #expect(try await root.getattr(2).mode == 0o102644)
        #expect(try lstatOf(fx.share + "/tool").st_mode & 0o7000 == 0)
    }

    // MARK: symlinks, sticky directories, killpriv, times (what a POSIX suite checks in the guest)

    /// A symlink keeps its creator and the gid of Tsymlink, and lchown persists: on the host it is
    /// a regular file holding the target, so the owner lives in its xattr like any other file's,
    /// follows it through rename and hard links, and the host never has a symlink the guest made.
    @Test func symlinksCarryTheirOwnerAndLchownPersists() async throws {
        let fx = try Fixture(metadata: true) { _, outside in try write(outside + "/canary", "secret") }
        defer { Task { await fx.close() } }
        let target = "../outside/canary"
        do {
            let c = try await fx.connect(attach: false)
            try await c.attach(fid: 0, uname: "user", nUname: 1000)
            guard case .rsymlink(let q) = try await c.call(.tsymlink(dfid: 0, name: "ln", target: P9String(target), gid: 100)) else {
                Issue.record("symlink"); return
            }
            #expect(q.type == P9.QidType.symlink)
            try await c.walk(0, 1, ["ln"])
            let a = try await c.getattr(1)
            #expect(a.uid == 1000 && a.gid == 100 && a.mode == 0o120777, "\(String(a.mode, radix: 8)) \(a.uid):\(a.gid)")
            #expect(a.size == UInt64(target.utf8.count))
            #expect(try await c.call(.treadlink(fid: 1)) == .rreadlink(target: P9String(target)))
            // Never followed by the server, never opened as a file.
            await #expect(throws: P9Errno(ENOTDIR)) { try await c.walk(1, 2, ["x"]) }
            await #expect(throws: P9Errno(ELOOP)) { try await c.lopen(1, P9.OpenFlags.rdonly) }
            // An existing name, symlink included, is never created over.
            await #expect(throws: P9Errno(EEXIST)) { try await c.call(.tsymlink(dfid: 0, name: "ln", target: "y", gid: 0)) }
            // lchown, as root does it (chown -h).
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid, uid: 2000, gid: 300))
            #expect(try await c.getattr(1).uid == 2000)
            // Renamed and hard-linked, it keeps its owner (the record is the inode's).
            try await c.call(.trenameat(olddirfid: 0, oldname: "ln", newdirfid: 0, newname: "moved"))
            try await c.walk(0, 3, ["moved"])
            try await c.call(.tlink(dfid: 0, fid: 3, name: "hard"))
            try await c.call(.tunlinkat(dirfid: 0, name: "moved", flags: 0))
            await c.close()
        }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["hard"])
        let a = try await c.getattr(1)
        #expect(a.uid == 2000 && a.gid == 300 && a.mode == 0o120777)
        #expect(try await c.call(.treadlink(fid: 1)) == .rreadlink(target: P9String(target)))
        // On the host: a regular file whose content is the target, no symlink to follow.
        #expect(try lstatOf(fx.share + "/hard").st_mode & S_IFMT == S_IFREG)
        #expect(try contents(fx.share + "/hard") == target)
        // Symlinks made on the host stay symlinks and show their host owner.
        symlink("elsewhere", fx.share + "/hostlink")
        try await c.walk(0, 2, ["hostlink"])
        let h = try await c.getattr(2)
        #expect(h.mode & 0o170000 == 0o120000 && h.uid == geteuid())
        #expect(try await c.call(.treadlink(fid: 2)) == .rreadlink(target: "elsewhere"))
        // lchown of one makes it a guest symlink in place, to keep the owner.
        try await c.setattr(2, P9SetAttr(valid: P9.SetattrMask.uid, uid: 1000))
        #expect(try await c.getattr(2).uid == 1000)
        try await c.walk(0, 3, ["hostlink"])
        let converted = try await c.getattr(3)
        #expect(converted.uid == 1000 && converted.mode == 0o120777)
        #expect(try await c.call(.treadlink(fid: 3)) == .rreadlink(target: "elsewhere"))
        #expect(try contents(fx.share + "/hostlink") == "elsewhere")
        #expect(try FileManager.default.contentsOfDirectory(atPath: fx.share).sorted() == ["hard", "hostlink"])
    }

    /// Sticky directories: the guest kernel decides (access=client), from the owners getattr
    /// reports, as Linux's check_sticky does: the caller owns the entry or the directory, or is
    /// root. So every kind of entry must report its guest owner, and the server must not refuse
    /// what that allows.
    @Test func stickyDirectoryRulesSeeTheGuestOwners() async throws {
        let fx = try Fixture(metadata: true)
        defer { Task { await fx.close() } }
        let root = try await fx.connect()
        try await root.mkdir(0, "tmp", mode: 0o1777)
        try await root.walk(0, 1, ["tmp"])
        #expect(try await root.getattr(1).mode == 0o41777)

        let user = try await fx.connect(attach: false)
        try await user.attach(fid: 0, uname: "user", nUname: 1000)
        try await user.walk(0, 1, ["tmp"])
        try await user.walk(1, 2, [])
        try await user.lcreate(2, "file", mode: 0o644, gid: 1000)
        try await user.mkdir(1, "dir", mode: 0o755)
        try await user.call(.tsymlink(dfid: 1, name: "link", target: "file", gid: 1000))
        try await user.call(.tmknod(dfid: 1, name: "fifo", mode: 0o10644, major: 0, minor: 0, gid: 1000))

        func mayDelete(_ dir: P9Attr, _ victim: P9Attr, fsuid: UInt32) -> Bool {
            dir.mode & UInt32(S_ISVTX) == 0 || fsuid == 0 || victim.uid == fsuid || dir.uid == fsuid
        }
        let dir = try await root.getattr(1)
        for (i, name) in ["file", "dir", "link", "fifo"].enumerated() {
            let fid = UInt32(10 + i)
            try await root.walk(1, fid, [name])
            let a = try await root.getattr(fid)
            #expect(mayDelete(dir, a, fsuid: 1000), "\(name): owner \(a.uid)")
            #expect(!mayDelete(dir, a, fsuid: 2000), "\(name): owner \(a.uid)")
            #expect(mayDelete(dir, a, fsuid: 0))
        }
        // What that allows, the server does.
        try await user.call(.trenameat(olddirfid: 1, oldname: "link", newdirfid: 1, newname: "link2"))
        try await user.call(.tunlinkat(dirfid: 1, name: "link2", flags: 0))
        try await user.call(.tunlinkat(dirfid: 1, name: "fifo", flags: 0))
        try await user.call(.tunlinkat(dirfid: 1, name: "dir", flags: P9.atRemoveDir))
        let other = try await fx.connect(attach: false)
        try await other.attach(fid: 0, uname: "other", nUname: 2000)
        try await other.walk(0, 1, ["tmp"])
        try await other.call(.tsymlink(dfid: 1, name: "theirs", target: "x", gid: 2000))
        try await root.walk(1, 20, ["theirs"])
        #expect(try await root.getattr(20).uid == 2000)
    }

    /// Linux clears setuid (and setgid with group execute) on truncate by a caller without
    /// CAP_FSETID, and on any chown of a non-directory.
    @Test func truncateAndChownClearSetuidAsLinuxDoes() async throws {
        let fx = try Fixture(metadata: true) { share, _ in
            for n in ["trunc", "otrunc", "chown", "keepsgid", "both"] { try write(share + "/" + n, "data") }
            try FileManager.default.createDirectory(atPath: share + "/dir", withIntermediateDirectories: false)
        }
        defer { Task { await fx.close() } }
        let root = try await fx.connect()
        let setup: [(UInt32, String, UInt32)] = [(1, "trunc", 0o6755), (2, "otrunc", 0o4777), (3, "chown", 0o6755),
                                                  (4, "keepsgid", 0o2644), (5, "dir", 0o2755), (6, "both", 0o6755)]
        for (fid, name, mode) in setup {
            try await root.walk(0, fid, [name])
            try await root.setattr(fid, P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid, uid: 1000, gid: 1000))
            try await root.setattr(fid, P9SetAttr(valid: P9.SetattrMask.mode, mode: mode))
        }
        #expect(try await root.getattr(1).mode == 0o106755)

        let user = try await fx.connect(attach: false)
        try await user.attach(fid: 0, uname: "other", nUname: 2000)
        try await user.walk(0, 1, ["trunc"])
        try await user.setattr(1, P9SetAttr(valid: P9.SetattrMask.size, size: 0))
        #expect(try await root.getattr(1).mode == 0o100755)
        try await user.walk(0, 2, ["otrunc"])
        try await user.lopen(2, P9.OpenFlags.wronly | P9.OpenFlags.trunc)
        #expect(try await root.getattr(2).mode == 0o100777)

        // chown clears them even for root; setgid stays without group execute (it means locking).
        try await root.setattr(3, P9SetAttr(valid: P9.SetattrMask.uid, uid: 1001))
        #expect(try await root.getattr(3).mode == 0o100755)
        try await root.setattr(4, P9SetAttr(valid: P9.SetattrMask.gid, gid: 1001))
        #expect(try await root.getattr(4).mode == 0o102644)
        try await root.setattr(5, P9SetAttr(valid: P9.SetattrMask.uid, uid: 1001))
        #expect(try await root.getattr(5).mode == 0o42755)
        // A mode in the same request is what the guest kernel already worked out: it stands.
        try await root.setattr(6, P9SetAttr(valid: P9.SetattrMask.mode | P9.SetattrMask.uid, mode: 0o6711, uid: 1001))
        #expect(try await root.getattr(6).mode == 0o106711)
        // Root truncating keeps them (CAP_FSETID).
        try await root.setattr(6, P9SetAttr(valid: P9.SetattrMask.size, size: 1))
        #expect(try await root.getattr(6).mode == 0o106711)
    }

    /// utimensat's nanoseconds reach the host inode and come back, with or without metadata, also
    /// after the metadata xattr is rewritten.
    @Test(arguments: [false, true]) func subSecondTimesPersist(metadata: Bool) async throws {
        let fx = try Fixture(metadata: metadata) { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        let t = P9.SetattrMask.atime | P9.SetattrMask.mtime | P9.SetattrMask.atimeSet | P9.SetattrMask.mtimeSet
        try await c.setattr(1, P9SetAttr(valid: t | P9.SetattrMask.ctime, atimeSec: 1_000_000_000, atimeNsec: 123_456_789,
                                          mtimeSec: 1_500_000_000, mtimeNsec: 987_654_321))
        if metadata {
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.mode, mode: 0o600))
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.uid, uid: 7))
        }
        let a = try await c.getattr(1)
        #expect(a.atimeSec == 1_000_000_000 && a.atimeNsec == 123_456_789)
        #expect(a.mtimeSec == 1_500_000_000 && a.mtimeNsec == 987_654_321)
        let host = try lstatOf(fx.share + "/f")
        #expect(host.st_mtim.tv_nsec == 987_654_321)
    }
}
