import CPlan9
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing

@testable import Plan9

/// A file outside the share whose content and times must never change, nor its atime show a read.
struct Canary {
    let path: String
    let text = "canary: never read me"
    let before: stat

    init(_ path: String) throws {
        self.path = path
        try write(path, text)
        // atime well before mtime: under relatime any read would move it.
        var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 2_000_000, tv_nsec: 0)]
        guard utimensat(AT_FDCWD, path, &times, 0) == 0 else { throw P9Errno(errno) }
        before = try lstatOf(path)
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let now = try lstatOf(path)
        #expect(try contents(path) == text, sourceLocation: sourceLocation)
        // contents() above reads it too, so compare with what we saw before that.
        #expect(now.st_mtim.tv_sec == before.st_mtim.tv_sec, sourceLocation: sourceLocation)
        #expect(now.st_atim.tv_sec == before.st_atim.tv_sec, "the canary was read", sourceLocation: sourceLocation)
        #expect(now.st_nlink == before.st_nlink, sourceLocation: sourceLocation)
        #expect(now.st_mode == before.st_mode, sourceLocation: sourceLocation)
        #expect(now.st_size == before.st_size, sourceLocation: sourceLocation)
    }

    /// Restores the atime after check() read the file itself.
    func reset() throws {
        var times = [before.st_atim, before.st_mtim]
        guard utimensat(AT_FDCWD, path, &times, 0) == 0 else { throw P9Errno(errno) }
    }
}

@Suite("Confinement")
struct ConfinementTests {
    @Test func dotDotNeverLeavesTheRoot() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/a/b", withIntermediateDirectories: true)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        let root = try await c.getattr(0).qid
        #expect(try await c.walk(0, 1, [".."]) == [root])
        let q = try await c.walk(0, 2, ["a", "b", "..", "..", "..", "..", ".."])
        #expect(q.count == 7)
        #expect(q.last == root)
        #expect(q[2] == q[0])  // a/b/.. is a
        #expect(try await c.names(2, newfid: 3) == ["a"])
        // Walking down from there is relative to the root, not the host's parent.
        await #expect(throws: P9Errno.enoent) { try await c.walk(2, 4, ["outside"]) }
        // ".." inside names is not a component.
        await #expect(throws: P9Errno(EINVAL)) { try await c.walk(0, 4, ["a/../.."]) }
        await #expect(throws: P9Errno(EINVAL)) { try await c.walk(0, 4, ["/etc"]) }
        // Readdir of the root reports the root itself as "..".
        try await c.walk(0, 5, [])
        try await c.lopen(5, P9.OpenFlags.directory)
        let entries = try await c.readdirAll(5).entries
        #expect(entries.first { $0.name == ".." }?.qid.path == root.path)
    }

    /// A fid keeps the directory it names when the host moves that directory out of the share:
    /// nothing may be created, linked, renamed or removed through it at its new place.
    @Test func directoryMovedOutByTheHostTakesNoChanges() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/dir", withIntermediateDirectories: true)
            try write(share + "/dir/old", "x")
            try write(share + "/f", "f")
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["dir"])
        try await c.walk(0, 2, ["dir"])
        try await c.walk(0, 3, ["f"])
        try await c.mkdir(1, "before")
        let moved = fx.outside + "/dir"
        #expect(Glibc.rename(fx.share + "/dir", moved) == 0)
        await #expect(throws: P9Errno.enoent) { try await c.lcreate(2, "new") }
        await #expect(throws: P9Errno.enoent) { try await c.mkdir(1, "d") }
        await #expect(throws: P9Errno.enoent) { try await c.call(.tsymlink(dfid: 1, name: "s", target: "x", gid: 0)) }
        await #expect(throws: P9Errno.enoent) {
            try await c.call(.tmknod(dfid: 1, name: "p", mode: 0o10644, major: 0, minor: 0, gid: 0))
        }
        await #expect(throws: P9Errno.enoent) { try await c.call(.tlink(dfid: 1, fid: 3, name: "l")) }
        await #expect(throws: P9Errno.enoent) {
            try await c.call(.trenameat(olddirfid: 0, oldname: "f", newdirfid: 1, newname: "r"))
        }
        await #expect(throws: P9Errno.enoent) { try await c.call(.trename(fid: 3, dfid: 1, name: "r")) }
        await #expect(throws: P9Errno.enoent) { try await c.call(.tunlinkat(dirfid: 1, name: "old", flags: 0)) }
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: moved)) == ["old", "before"])
        #expect(try contents(fx.share + "/f") == "f")
        // Moved back into the share, it takes changes again.
        #expect(Glibc.rename(moved, fx.share + "/dir") == 0)
        try await c.mkdir(1, "after")
        #expect(FileManager.default.fileExists(atPath: fx.share + "/dir/after"))
    }

    @Test func symlinksPointingOutsideAreNotFollowed() async throws {
        var canary: Canary!
        let fx = try Fixture { share, outside in
            canary = try Canary(outside + "/secret")
            try FileManager.default.createDirectory(atPath: share + "/sub", withIntermediateDirectories: true)
            #expect(Glibc.symlink("/etc", share + "/etc") == 0)
            #expect(Glibc.symlink(outside, share + "/abs") == 0)
            #expect(Glibc.symlink("../../outside", share + "/sub/rel") == 0)
            #expect(Glibc.symlink("../outside/secret", share + "/relfile") == 0)
            #expect(Glibc.symlink(outside + "/secret", share + "/absfile") == 0)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        // The link itself is visible, as a link.
        let q = try await c.walk(0, 1, ["etc"])
        #expect(q.first?.type == P9.QidType.symlink)
        #expect(try await c.call(.treadlink(fid: 1)) == .rreadlink(target: "/etc"))
        // But nothing resolves through it.
        // (A partial walk: Rwalk stops at the link and newfid is not created.)
        #expect(try await c.walk(0, 2, ["etc", "passwd"]).count == 1)
        #expect(try await c.walk(0, 2, ["abs", "secret"]).count == 1)
        #expect(try await c.walk(0, 2, ["sub", "rel", "secret"]).count == 2)
        await #expect(throws: P9Errno(EBADF)) { try await c.getattr(2) }
        try await c.walk(0, 2, ["abs"])
        await #expect(throws: P9Errno(ENOTDIR)) { try await c.walk(2, 6, ["secret"]) }
        for link in ["relfile", "absfile", "abs", "etc"] {
            try await c.walk(0, 3, [link])
            await #expect(throws: P9Errno(ELOOP)) { try await c.lopen(3, P9.OpenFlags.rdonly) }
            await #expect(throws: P9Errno(ELOOP)) { try await c.lopen(3, P9.OpenFlags.rdwr | P9.OpenFlags.trunc) }
            // Its attributes are the link's, not the target's.
            #expect(try await c.getattr(3).mode & 0o170000 == 0o120000)
            // Changing it changes the link at most.
            try? await c.setattr(3, P9SetAttr(valid: P9.SetattrMask.size, size: 0))
            try? await c.setattr(3, P9SetAttr(valid: P9.SetattrMask.mode, mode: 0o777))
            try? await c.setattr(3, P9SetAttr(valid: P9.SetattrMask.mtime | P9.SetattrMask.mtimeSet, mtimeSec: 5))
            _ = try? await c.call(.txattrcreate(fid: 3, name: "user.x", size: 1, flags: 0))
            try await c.clunk(3)
        }
        // Creating through a link: lcreate in a symlink "directory" is refused.
        try await c.walk(0, 4, ["abs"])
        await #expect(throws: P9Errno(ENOTDIR)) { try await c.lcreate(4, "secret", flags: P9.OpenFlags.rdwr | P9.OpenFlags.trunc) }
        await #expect(throws: P9Errno(ENOTDIR)) { try await c.mkdir(4, "x") }
        await #expect(throws: P9Errno(ENOTDIR)) { try await c.call(.tunlinkat(dirfid: 4, name: "secret", flags: 0)) }
        // lcreate over an existing symlink name opens nothing behind it.
        try await c.walk(0, 5, [])
        await #expect(throws: P9Errno(EEXIST)) { try await c.lcreate(5, "absfile", flags: P9.OpenFlags.rdwr | P9.OpenFlags.trunc) }
        try canary.check()
    }

    @Test func hardLinksCannotReachOutside() async throws {
        var canary: Canary!
        let fx = try Fixture { share, outside in
            canary = try Canary(outside + "/secret")
            #expect(Glibc.symlink(outside + "/secret", share + "/ptr") == 0)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        // The only things a guest can link are fids, and every fid is inside the share. Linking a
        // symlink that points outside links the symlink, not its target.
        try await c.walk(0, 1, ["ptr"])
        try await c.call(.tlink(dfid: 0, fid: 1, name: "ptr2"))
        let st = try lstatOf(fx.share + "/ptr2")
        #expect(st.st_mode & S_IFMT == S_IFLNK)
        // Linking a directory is refused.
        try await c.walk(0, 2, [])
        await #expect(throws: P9Errno(EPERM)) { try await c.call(.tlink(dfid: 0, fid: 2, name: "rootlink")) }
        // A name with a path in it cannot smuggle a target.
        await #expect(throws: P9Errno(EINVAL)) { try await c.call(.tlink(dfid: 0, fid: 1, name: "../outside/x")) }
        await #expect(throws: P9Errno(EINVAL)) {
            try await c.call(.trenameat(olddirfid: 0, oldname: "ptr", newdirfid: 0, newname: "../escaped"))
        }
        #expect(!FileManager.default.fileExists(atPath: fx.base + "/escaped"))
        #expect(!FileManager.default.fileExists(atPath: fx.outside + "/x"))
        try canary.check()
    }

    @Test func specialFilesAreNeverOpened() async throws {
        let fx = try Fixture { share, _ in
            #expect(mkfifo(share + "/fifo", 0o666) == 0)
            // A device node (needs root) and a symlink to one.
            _ = mknod(share + "/null", S_IFCHR | 0o666, UInt(cp9_makedev(1, 3)))
            #expect(Glibc.symlink("/dev/zero", share + "/zero") == 0)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["fifo"])
        #expect(try await c.getattr(1).mode & 0o170000 == 0o010000)
        for flags in [P9.OpenFlags.rdonly, P9.OpenFlags.wronly, P9.OpenFlags.rdwr] {
            await #expect(throws: P9Errno(EPERM)) { try await c.lopen(1, flags) }
        }
        // Truncating it would need an open: refused without opening.
        await #expect(throws: P9Errno(EINVAL)) { try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.size, size: 0)) }
        // lcreate of an existing FIFO's name does not open it either.
        try await c.walk(0, 2, [])
        await #expect(throws: P9Errno(EEXIST)) { try await c.lcreate(2, "fifo", flags: P9.OpenFlags.wronly) }
        if FileManager.default.fileExists(atPath: fx.share + "/null") {
            try await c.walk(0, 3, ["null"])
            #expect(try await c.getattr(3).mode & 0o170000 == 0o020000)
            await #expect(throws: P9Errno(EPERM)) { try await c.lopen(3, P9.OpenFlags.rdwr) }
        }
        try await c.walk(0, 4, ["zero"])
        await #expect(throws: P9Errno(ELOOP)) { try await c.lopen(4, P9.OpenFlags.rdonly) }
        // The guest cannot make device nodes on the host.
        await #expect(throws: P9Errno(EPERM)) {
            try await c.call(.tmknod(dfid: 0, name: "sda", mode: 0o60600, major: 8, minor: 0, gid: 0))
        }
        await #expect(throws: P9Errno(EPERM)) {
            try await c.call(.tmknod(dfid: 0, name: "mem", mode: 0o20600, major: 1, minor: 1, gid: 0))
        }
        #expect(!FileManager.default.fileExists(atPath: fx.share + "/sda"))
        // FIFOs may be made (inert on the host: never opened by the server).
        try await c.call(.tmknod(dfid: 0, name: "p2", mode: 0o10644, major: 0, minor: 0, gid: 0))
        #expect(try lstatOf(fx.share + "/p2").st_mode & S_IFMT == S_IFIFO)
    }

    /// A thread swaps `share/dir` between a real directory and a symlink to the outside directory
    /// while the client walks, opens, reads, writes, creates and truncates through it.
    @Test func symlinkSwapRace() async throws {
        var canary: Canary!
        let fx = try Fixture { share, outside in
            canary = try Canary(outside + "/canary")
            try FileManager.default.createDirectory(atPath: share + "/real", withIntermediateDirectories: true)
            try write(share + "/real/canary", "inside")
            #expect(Glibc.symlink(outside, share + "/link") == 0)
            #expect(Glibc.rename(share + "/real", share + "/dir") == 0)
        }
        defer { Task { await fx.close() } }
        let stop = NIOLockedValueBox(false)
        let share = fx.share
        let swapper = Thread {
            // rename(2) atomically replaces "dir" with either the directory or the symlink.
            var toLink = true
            while !stop.withLockedValue({ $0 }) {
                if toLink {
                    _ = Glibc.rename(share + "/dir", share + "/real")
                    _ = Glibc.rename(share + "/link", share + "/dir")
                } else {
                    _ = Glibc.rename(share + "/dir", share + "/link")
                    _ = Glibc.rename(share + "/real", share + "/dir")
                }
                toLink.toggle()
            }
        }
        swapper.start()
        let c = try await fx.connect()
        var reads = 0
        var sawLink = 0
        var sawDir = 0
        // At least 3 s of racing, and on a loaded machine longer: until the server has seen both
        // states and served a read (60 s at most), so that the assertions below test a real race.
        let start = Date()
        var i: UInt32 = 0
        while Date().timeIntervalSince(start) < 3
            || (!(sawLink > 0 && sawDir > 0 && reads > 0) && Date().timeIntervalSince(start) < 60) {
            i += 1
            let fid = 10 + (i % 1000)
            if (try? await c.walk(0, fid, ["dir", "canary"])) != nil {
                if (try? await c.lopen(fid, P9.OpenFlags.rdwr)) != nil {
                    if let d = try? await c.read(fid) {
                        #expect(d != Array(canary.text.utf8))
                        reads += 1
                    }
                    _ = try? await c.write(fid, offset: 5, Array("X".utf8))
                }
                _ = try? await c.setattr(fid, P9SetAttr(valid: P9.SetattrMask.mtime | P9.SetattrMask.mtimeSet, mtimeSec: 9))
                _ = try? await c.call(.txattrcreate(fid: fid, name: "user.x", size: 0, flags: 0))
                _ = try? await c.clunk(fid)
            }
            if let q = try? await c.walk(0, fid, ["dir"]) {
                if q.first?.type == P9.QidType.symlink { sawLink += 1 } else { sawDir += 1 }
                _ = try? await c.lcreate(fid, "canary", flags: P9.OpenFlags.wronly | P9.OpenFlags.trunc)
                _ = try? await c.clunk(fid)
            }
            if (try? await c.walk(0, fid, ["dir"])) != nil {
                _ = try? await c.call(.tunlinkat(dirfid: fid, name: "canary", flags: 0))
                _ = try? await c.call(.tsymlink(dfid: fid, name: "canary2", target: "x", gid: 0))
                _ = try? await c.clunk(fid)
            }
        }
        stop.withLockedValue { $0 = true }
        while !swapper.isFinished { try await Task.sleep(nanoseconds: 1_000_000) }
        // Both states were really seen by the server.
        #expect(sawLink > 0 && sawDir > 0 && reads > 0, "links \(sawLink) dirs \(sawDir) reads \(reads)")
        try canary.check()
        #expect(!FileManager.default.fileExists(atPath: fx.outside + "/canary2"))
        let outsideNames = try FileManager.default.contentsOfDirectory(atPath: fx.outside)
        #expect(outsideNames == ["canary"])
    }
}
