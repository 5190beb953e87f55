import Foundation
import NIOCore
import Testing

@testable import Plan9

@Suite("Server operations")
struct ServerTests {
    @Test func versionNegotiation() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect(attach: false)
        #expect(try await c.version(msize: 4 << 20) == P9.maxMsize)
        #expect(try await c.version(msize: 8192) == 8192)
        let r = try await c.send(.tversion(msize: 8192, version: "9P2000.u"), tag: P9.noTag).reply.get()
        #expect(r == .rversion(msize: 8192, version: "unknown"))
        let small = try await c.send(.tversion(msize: 512, version: "9P2000.L"), tag: P9.noTag).reply.get()
        guard case .rversion(_, let v) = small else { Issue.record("\(small)"); return }
        #expect(v == "unknown")
        // A new Tversion clunks every fid.
        #expect(try await c.version(msize: 8192) == 8192)
        try await c.attach(fid: 0)
        #expect(try await c.version(msize: 8192) == 8192)
        await #expect(throws: P9Errno(EBADF)) { try await c.getattr(0) }
    }

    @Test func walkOpenReadWrite() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/a/b", withIntermediateDirectories: true)
            try write(share + "/a/b/hello.txt", "hello, world")
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        let qids = try await c.walk(0, 1, ["a", "b", "hello.txt"])
        #expect(qids.count == 3)
        #expect(qids[0].type == P9.QidType.dir)
        #expect(qids[2].type == P9.QidType.file)
        let st = try lstatOf(fx.share + "/a/b/hello.txt")
        #expect(qids[2].path == UInt64(st.st_ino))
        let attr = try await c.getattr(1)
        #expect(attr.size == 12)
        #expect(attr.mode == UInt32(st.st_mode))
        #expect(attr.qid == qids[2])
        try await c.lopen(1, P9.OpenFlags.rdwr)
        #expect(try await c.read(1) == Array("hello, world".utf8))
        #expect(try await c.read(1, offset: 7, count: 3) == Array("wor".utf8))
        #expect(try await c.read(1, offset: 100) == [])
        #expect(try await c.write(1, offset: 7, Array("WORLD!".utf8)) == 6)
        #expect(try contents(fx.share + "/a/b/hello.txt") == "hello, WORLD!")
        try await c.clunk(1)
        await #expect(throws: P9Errno(EBADF)) { try await c.read(1) }

        // Partial walk: Rwalk with the qids that worked, newfid not created.
        let partial = try await c.walk(0, 2, ["a", "nope", "x"])
        #expect(partial.count == 1)
        await #expect(throws: P9Errno(EBADF)) { try await c.getattr(2) }
        await #expect(throws: P9Errno.enoent) { try await c.walk(0, 2, ["nope"]) }
        // Walking through a file.
        #expect(try await c.walk(0, 2, ["a", "b", "hello.txt", "x"]).count == 3)
        try await c.walk(0, 2, ["a", "b", "hello.txt"])
        await #expect(throws: P9Errno(ENOTDIR)) { try await c.walk(2, 4, ["x"]) }
        // Clone, then walk in place.
        try await c.walk(0, 3, [])
        try await c.walk(3, 3, ["a"])
        #expect(try await c.getattr(3).qid.type == P9.QidType.dir)
        // fid in use.
        await #expect(throws: P9Errno(EBADF)) { try await c.walk(0, 3, ["a"]) }
        // Opening a directory for writing.
        await #expect(throws: P9Errno(EISDIR)) { try await c.lopen(3, P9.OpenFlags.wronly) }
    }

    @Test func createRenameUnlinkAndErrnos() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, [])
        let q = try await c.lcreate(1, "new.txt", flags: P9.OpenFlags.rdwr, mode: 0o640)
        #expect(q.type == P9.QidType.file)
        try await c.write(1, Array("data".utf8))
        try await c.clunk(1)
        #expect(try contents(fx.share + "/new.txt") == "data")
        #expect(try lstatOf(fx.share + "/new.txt").st_mode & 0o777 == 0o640)

        // EEXIST with O_EXCL; without it the existing file is opened (and truncated if asked).
        try await c.walk(0, 1, [])
        await #expect(throws: P9Errno(EEXIST)) {
            try await c.lcreate(1, "new.txt", flags: P9.OpenFlags.rdwr | P9.OpenFlags.create | P9.OpenFlags.excl)
        }
        try await c.lcreate(1, "new.txt", flags: P9.OpenFlags.rdwr | P9.OpenFlags.create | P9.OpenFlags.trunc)
        try await c.clunk(1)
        #expect(try contents(fx.share + "/new.txt") == "")

        try await c.mkdir(0, "dir", mode: 0o750)
        #expect(try lstatOf(fx.share + "/dir").st_mode & 0o777 == 0o750)
        await #expect(throws: P9Errno(EEXIST)) { try await c.mkdir(0, "dir") }
        await #expect(throws: P9Errno(EEXIST)) { try await c.mkdir(0, "new.txt") }

        try await c.call(.trenameat(olddirfid: 0, oldname: "new.txt", newdirfid: 0, newname: "renamed.txt"))
        #expect(FileManager.default.fileExists(atPath: fx.share + "/renamed.txt"))
        #expect(!FileManager.default.fileExists(atPath: fx.share + "/new.txt"))
        await #expect(throws: P9Errno.enoent) {
            try await c.call(.trenameat(olddirfid: 0, oldname: "new.txt", newdirfid: 0, newname: "x"))
        }
        try await c.walk(0, 2, ["dir"])
        try await c.call(.trenameat(olddirfid: 0, oldname: "renamed.txt", newdirfid: 2, newname: "inside.txt"))
        #expect(FileManager.default.fileExists(atPath: fx.share + "/dir/inside.txt"))

        await #expect(throws: P9Errno(ENOTEMPTY)) {
            try await c.call(.tunlinkat(dirfid: 0, name: "dir", flags: P9.atRemoveDir))
        }
        await #expect(throws: P9Errno(EISDIR)) { try await c.call(.tunlinkat(dirfid: 0, name: "dir", flags: 0)) }
        await #expect(throws: P9Errno(ENOTDIR)) {
            try await c.call(.tunlinkat(dirfid: 2, name: "inside.txt", flags: P9.atRemoveDir))
        }
        try await c.call(.tunlinkat(dirfid: 2, name: "inside.txt", flags: 0))
        await #expect(throws: P9Errno.enoent) { try await c.call(.tunlinkat(dirfid: 2, name: "inside.txt", flags: 0)) }
        try await c.call(.tunlinkat(dirfid: 0, name: "dir", flags: P9.atRemoveDir))
        #expect(!FileManager.default.fileExists(atPath: fx.share + "/dir"))

        // Symlinks and hard links.
        try await c.call(.tsymlink(dfid: 0, name: "sl", target: "some/where", gid: 0))
        try await c.walk(0, 3, ["sl"])
        #expect(try await c.call(.treadlink(fid: 3)) == .rreadlink(target: "some/where"))
        try write(fx.share + "/f", "x")
        try await c.walk(0, 4, ["f"])
        try await c.call(.tlink(dfid: 0, fid: 4, name: "f2"))
        #expect(try lstatOf(fx.share + "/f").st_nlink == 2)
        #expect(try lstatOf(fx.share + "/f2").st_ino == lstatOf(fx.share + "/f").st_ino)

        // setattr: size, mode, times; chown to another user is refused.
        try await c.setattr(4, P9SetAttr(valid: P9.SetattrMask.size, size: 100))
        #expect(try lstatOf(fx.share + "/f").st_size == 100)
        try await c.setattr(4, P9SetAttr(valid: P9.SetattrMask.mode, mode: 0o4755))
        #expect(try lstatOf(fx.share + "/f").st_mode & 0o7777 == 0o755)  // never setuid on the host
        try await c.setattr(4, P9SetAttr(valid: P9.SetattrMask.mtime | P9.SetattrMask.mtimeSet | P9.SetattrMask.atime
                                            | P9.SetattrMask.atimeSet,
                                         atimeSec: 1_000_000, mtimeSec: 2_000_000, mtimeNsec: 5))
        let st = try lstatOf(fx.share + "/f")
        #expect(st.st_mtim.tv_sec == 2_000_000 && st.st_mtim.tv_nsec == 5)
        #expect(st.st_atim.tv_sec == 1_000_000)
        let a = try await c.getattr(4)
        #expect(a.mtimeSec == 2_000_000)
        await #expect(throws: P9Errno(EPERM)) {
            try await c.setattr(4, P9SetAttr(valid: P9.SetattrMask.uid, uid: a.uid + 1))
        }
        try await c.setattr(4, P9SetAttr(valid: P9.SetattrMask.uid | P9.SetattrMask.gid, uid: a.uid, gid: a.gid))

        // Legacy Trename / Tremove name the file by fid.
        try await c.call(.trename(fid: 4, dfid: 0, name: "g"))
        #expect(FileManager.default.fileExists(atPath: fx.share + "/g"))
        try await c.walk(4, 5, [])
        try await c.call(.tremove(fid: 4))
        #expect(!FileManager.default.fileExists(atPath: fx.share + "/g"))
        await #expect(throws: P9Errno(EBADF)) { try await c.getattr(4) }  // clunked by Tremove
        try await c.walk(0, 7, [])
        await #expect(throws: P9Errno(EBUSY)) { try await c.call(.tremove(fid: 7)) }
        await #expect(throws: P9Errno(EBADF)) { try await c.getattr(7) }  // clunked even so

        // statfs and fsync.
        guard case .rstatfs(let sfs) = try await c.call(.tstatfs(fid: 0)) else { Issue.record("statfs"); return }
        #expect(sfs.bsize > 0 && sfs.namelen == 255)
        try await c.walk(0, 6, [])
        try await c.lcreate(6, "sync.txt")
        try await c.call(.tfsync(fid: 6, datasync: 0))
        try await c.call(.tfsync(fid: 6, datasync: 1))

        // Names that are not one component.
        for bad in ["", ".", "..", "a/b", "/etc"] {
            await #expect(throws: P9Errno(EINVAL)) { try await c.mkdir(0, bad) }
        }
        await #expect(throws: P9Errno(ENAMETOOLONG)) { try await c.mkdir(0, String(repeating: "n", count: 256)) }
    }

    @Test func readOnlyExportRefusesChanges() async throws {
        let fx = try Fixture(readOnly: true) { share, _ in
            try write(share + "/f", "keep")
            try FileManager.default.createDirectory(atPath: share + "/d", withIntermediateDirectories: true)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        let erofs = P9Errno(EROFS)
        try await c.walk(0, 1, [])
        await #expect(throws: erofs) { try await c.lcreate(1, "x") }
        await #expect(throws: erofs) { try await c.mkdir(0, "x") }
        await #expect(throws: erofs) { try await c.call(.tsymlink(dfid: 0, name: "s", target: "f", gid: 0)) }
        await #expect(throws: erofs) { try await c.call(.tmknod(dfid: 0, name: "p", mode: 0o10644, major: 0, minor: 0, gid: 0)) }
        await #expect(throws: erofs) { try await c.call(.tunlinkat(dirfid: 0, name: "f", flags: 0)) }
        await #expect(throws: erofs) { try await c.call(.trenameat(olddirfid: 0, oldname: "f", newdirfid: 0, newname: "g")) }
        try await c.walk(0, 2, ["f"])
        await #expect(throws: erofs) { try await c.call(.tlink(dfid: 0, fid: 2, name: "h")) }
        await #expect(throws: erofs) { try await c.setattr(2, P9SetAttr(valid: P9.SetattrMask.size, size: 0)) }
        await #expect(throws: erofs) { try await c.lopen(2, P9.OpenFlags.wronly) }
        await #expect(throws: erofs) { try await c.lopen(2, P9.OpenFlags.rdonly | P9.OpenFlags.trunc) }
        await #expect(throws: erofs) { try await c.call(.txattrcreate(fid: 2, name: "user.a", size: 1, flags: 0)) }
        try await c.lopen(2, P9.OpenFlags.rdonly)
        #expect(try await c.read(2) == Array("keep".utf8))
        await #expect(throws: erofs) { try await c.write(2, Array("x".utf8)) }
        await #expect(throws: erofs) { try await c.call(.tremove(fid: 2)) }
        #expect(try contents(fx.share + "/f") == "keep")
        #expect(try await c.names(0, newfid: 3) == ["f", "d"])
    }

    @Test func readdirOfTenThousandEntries() async throws {
        let count = 10_000
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/big", withIntermediateDirectories: true)
            for i in 0..<count {
                let fd = open(share + "/big/entry-\(i)", O_CREAT | O_WRONLY, 0o644)
                Glibc.close(fd)
            }
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect(msize: 8192)
        try await c.walk(0, 1, ["big"])
        try await c.lopen(1, P9.OpenFlags.rdonly | P9.OpenFlags.directory)
        let (entries, calls) = try await c.readdirAll(1, count: 4096)
        let names = entries.map(\.name.description).filter { $0 != "." && $0 != ".." }
        #expect(names.count == count)
        #expect(Set(names).count == count)
        #expect(calls > 20)  // really in many pieces
        // qids from readdir match walks.
        let sample = try #require(entries.first { $0.name.description == "entry-1234" })
        let q = try await c.walk(0, 2, ["big", "entry-1234"])
        #expect(q.last == sample.qid)
        // An offset from the middle, reused later, continues at the same place.
        let mid = entries[5000]
        let (again, _) = try await c.readdir(1, offset: mid.offset, count: 4096)
        #expect(again.first?.name == entries[5001].name)
        // A count too small for one entry is an error, not a silent end of directory.
        await #expect(throws: P9Errno(EINVAL)) { try await c.readdir(1, offset: 0, count: 10) }
        // An unopened directory fid cannot be read as a directory.
        try await c.walk(0, 3, ["big"])
        await #expect(throws: P9Errno(EBADF)) { try await c.readdir(3, offset: 0, count: 4096) }
    }

    @Test func repliesNeverExceedMsize() async throws {
        let fx = try Fixture { share, _ in
            try Data(repeating: 0x61, count: 1 << 20).write(to: URL(fileURLWithPath: share + "/big"))
            try FileManager.default.createDirectory(atPath: share + "/d", withIntermediateDirectories: true)
            for i in 0..<300 { try write(share + "/d/" + String(repeating: "x", count: 200) + "\(i)", "") }
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect(msize: 4096)
        try await c.walk(0, 1, ["big"])
        try await c.lopen(1)
        let data = try await c.read(1, count: 1 << 20)
        #expect(data.count == 4096 - P9.ioHeaderSize)
        try await c.walk(0, 2, ["d"])
        try await c.lopen(2, P9.OpenFlags.directory)
        let (entries, bytes) = try await c.readdir(2, offset: 0, count: 1 << 20)
        #expect(bytes + 11 < 4096)
        #expect(!entries.isEmpty)
        // A write larger than msize is a protocol violation (the frame is bigger than agreed).
    }

    @Test func xattrs() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.call(.txattrcreate(fid: 1, name: "user.color", size: 4, flags: 0))
        try await c.write(1, Array("blue".utf8))
        try await c.clunk(1)
        try await c.walk(0, 1, ["f"])
        guard case .rxattrwalk(let size) = try await c.call(.txattrwalk(fid: 1, newfid: 2, name: "user.color")) else {
            Issue.record("xattrwalk"); return
        }
        #expect(size == 4)
        #expect(try await c.read(2, count: 100) == Array("blue".utf8))
        try await c.clunk(2)
        guard case .rxattrwalk(let lsize) = try await c.call(.txattrwalk(fid: 1, newfid: 2, name: "")) else {
            Issue.record("list"); return
        }
        #expect(try await c.read(2, count: 100) == Array("user.color\0".utf8))
        #expect(lsize == 11)
        try await c.clunk(2)
        await #expect(throws: P9Errno(ENODATA)) { try await c.call(.txattrwalk(fid: 1, newfid: 2, name: "user.none")) }
        // Other namespaces mean something to the host kernel: not reachable.
        for name in ["security.capability", "trusted.overlay.opaque", "system.posix_acl_access", "user.uvm.stat"] {
            await #expect(throws: P9Errno(EOPNOTSUPP)) {
                try await c.call(.txattrcreate(fid: 1, name: P9String(name), size: 1, flags: 0))
            }
            await #expect(throws: P9Errno(EOPNOTSUPP)) {
                try await c.call(.txattrwalk(fid: 1, newfid: 2, name: P9String(name)))
            }
        }
        // Zero-size create is the client's removexattr.
        try await c.call(.txattrcreate(fid: 1, name: "user.color", size: 0, flags: UInt32(Plan9Session.xattrReplace)))
        try await c.clunk(1)
        try await c.walk(0, 1, ["f"])
        await #expect(throws: P9Errno(ENODATA)) { try await c.call(.txattrwalk(fid: 1, newfid: 2, name: "user.color")) }
    }

    @Test func locks() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.walk(0, 2, ["f"])
        try await c.lopen(1, P9.OpenFlags.rdwr)
        try await c.lopen(2, P9.OpenFlags.rdwr)
        let wr = P9Lock(type: P9.LockType.wrlck, start: 0, length: 0, procID: 1, clientID: "g")
        #expect(try await c.call(.tlock(fid: 1, lock: wr)) == .rlock(status: P9.LockStatus.success))
        #expect(try await c.call(.tlock(fid: 2, lock: wr)) == .rlock(status: P9.LockStatus.blocked))
        guard case .rgetlock(let held) = try await c.call(.tgetlock(fid: 2, lock: wr)) else { Issue.record("getlock"); return }
        #expect(held.type == P9.LockType.wrlck)
        var un = wr
        un.type = P9.LockType.unlck
        #expect(try await c.call(.tlock(fid: 1, lock: un)) == .rlock(status: P9.LockStatus.success))
        #expect(try await c.call(.tlock(fid: 2, lock: wr)) == .rlock(status: P9.LockStatus.success))
        // Clunking the holder releases its locks.
        try await c.clunk(2)
        #expect(try await c.call(.tlock(fid: 1, lock: wr)) == .rlock(status: P9.LockStatus.success))
    }

    @Test func subMountsGetDistinctQids() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/m", withIntermediateDirectories: true)
        }
        defer { Task { await fx.close() } }
        guard mount("none", fx.share + "/m", "tmpfs", 0, nil) == 0 else { return }  // needs CAP_SYS_ADMIN
        defer { umount2(fx.share + "/m", Int32(MNT_DETACH)) }
        try write(fx.share + "/m/inner", "")
        let c = try await fx.connect()
        let mroot = try await c.walk(0, 1, ["m"])
        let inner = try await c.walk(0, 2, ["m", "inner"])
        // tmpfs numbers its root inode 1 and first files 2, 3...; qids must not collide with the
        // share's own inodes of those numbers.
        let innerSt = try lstatOf(fx.share + "/m/inner")
        #expect(inner.last!.path != UInt64(innerSt.st_ino))
        #expect(mroot.last!.path != inner.last!.path)
        let rootQ = try await c.getattr(0).qid
        #expect(Set([rootQ.path, mroot.last!.path, inner.last!.path]).count == 3)
    }

    @Test func listenerServesSessionsUntilClosed() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "listened") }
        defer { Task { await fx.close() } }
        let sock = fx.base + "/9p.sock"
        let listener = try fx.server.listen(unixSocketPath: sock)
        let c = try await Plan9Client.connect(unixSocketPath: sock)
        _ = try await c.version(msize: 8192)
        try await c.attach(fid: 0)
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1)
        #expect(try await c.read(1) == Array("listened".utf8))
        // Closing shuts the socket down, which also wakes the thread blocked in accept (awaited
        // only then: a future's wait is not cancellable); the session already open goes on.
        listener.close()
        let refused = (try? await Plan9Client.connect(unixSocketPath: sock)) == nil
        #expect(refused)
        if refused { try await listener.closed() }
        #expect(try await c.getattr(1).size == 8)
        await c.close()
    }
}
