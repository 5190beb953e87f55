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
}
