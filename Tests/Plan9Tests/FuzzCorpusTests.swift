import Foundation
import NIOCore
import Testing

@testable import Plan9

/// The seed corpus of the fuzz target (scripts/fuzz-9p.sh) is client traffic recorded from these
/// sessions against the fuzz tree. `UVM_9P_WRITE_CORPUS=1 swift test --filter FuzzCorpus` rewrites
/// it; every run replays it (and any crash reproducers saved there) through the fuzz target.
@Suite("Fuzz corpus", .serialized)
struct FuzzCorpusTests {
    static let corpusDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("corpus").path

    typealias Session = @Sendable (Plan9Client) async throws -> Void
    static let memory = Plan9Fuzz.makeGuestMemory()

    static let sessions: [(String, UInt32, Session)] = [
        ("read-file", 1 << 20, { c in
            try await c.walk(0, 1, ["file"])
            _ = try await c.getattr(1)
            try await c.lopen(1)
            _ = try await c.read(1, count: 8192)
            try await c.clunk(1)
            try await c.call(.tstatfs(fid: 0))
        }),
        ("readdir", 8192, { c in
            try await c.walk(0, 1, ["dir"])
            try await c.lopen(1, P9.OpenFlags.directory)
            _ = try await c.readdirAll(1, count: 64)
            try await c.clunk(1)
        }),
        ("create-write-rename-unlink", 65536, { c in
            try await c.walk(0, 1, ["dir"])
            try await c.lcreate(1, "new", flags: P9.OpenFlags.rdwr | P9.OpenFlags.create, mode: 0o644)
            try await c.write(1, offset: 0, Array("some data".utf8))
            try await c.call(.tfsync(fid: 1, datasync: 1))
            try await c.setattr(1, P9SetAttr(valid: P9.SetattrMask.size | P9.SetattrMask.mode | P9.SetattrMask.mtime
                                                | P9.SetattrMask.mtimeSet, mode: 0o600, size: 4, mtimeSec: 1000))
            try await c.clunk(1)
            try await c.call(.trenameat(olddirfid: 0, oldname: "file", newdirfid: 0, newname: "file2"))
            try await c.call(.trenameat(olddirfid: 0, oldname: "file2", newdirfid: 0, newname: "file"))
            try await c.mkdir(0, "newdir")
            try await c.call(.tsymlink(dfid: 0, name: "sl", target: "dir/new", gid: 0))
            try await c.walk(0, 2, ["sl"])
            try await c.call(.treadlink(fid: 2))
            try await c.walk(0, 3, ["dir", "new"])
            try await c.call(.tlink(dfid: 0, fid: 3, name: "hard"))
            try await c.call(.tmknod(dfid: 0, name: "pipe", mode: 0o10644, major: 0, minor: 0, gid: 0))
            for n in ["hard", "sl", "pipe"] { try await c.call(.tunlinkat(dirfid: 0, name: P9String(n), flags: 0)) }
            try await c.call(.tunlinkat(dirfid: 0, name: "newdir", flags: P9.atRemoveDir))
            try await c.walk(0, 4, ["dir"])
            try await c.call(.tunlinkat(dirfid: 4, name: "new", flags: 0))
        }),
        ("change-notes", 65536, { c in
            try await c.call(.tuvmnotify(flags: 0))
            try await c.walk(0, 1, ["dir"])
            try await c.lcreate(1, "noted", flags: P9.OpenFlags.rdwr | P9.OpenFlags.create, mode: 0o644)
            try await c.write(1, offset: 0, Array("x".utf8))
            try await c.clunk(1)
            try await c.walk(0, 2, ["dir"])
            try await c.call(.trenameat(olddirfid: 2, oldname: "noted", newdirfid: 0, newname: "noted"))
            try await c.call(.tunlinkat(dirfid: 0, name: "noted", flags: 0))
            _ = try? await c.walk(0, 3, ["dir", "missing"])
        }),
        ("uvm-create-and-batch-clunk", 65536, { c in
            try await c.call(.tuvmnotify(flags: 0))
            try await c.walk(0, 1, ["dir"])
            let excl = UInt32(O_RDWR | O_CREAT | O_EXCL)
            try await c.call(.tuvmlcreate(dfid: 1, ofid: 2, pfid: 3, name: "batched", flags: excl, mode: 0o644, gid: 0))
            try await c.walk(0, 4, ["file"])
            try await c.call(.tuvmclunk(fids: [2, 4]))
            try await c.call(.tunlinkat(dirfid: 1, name: "batched", flags: 0))
            _ = try? await c.call(.tuvmclunk(fids: [3, 3, 77]))
        }),
        ("escape-attempts", 8192, { c in
            _ = try? await c.walk(0, 1, ["..", ".."])
            _ = try? await c.walk(0, 2, ["etc", "passwd"])
            _ = try? await c.walk(0, 3, ["escape"])
            _ = try? await c.lopen(3, P9.OpenFlags.rdwr)
            _ = try? await c.walk(0, 4, ["fifo"])
            _ = try? await c.lopen(4)
            _ = try? await c.walk(0, 5, [])
            _ = try? await c.lcreate(5, "fifo", flags: P9.OpenFlags.wronly)
            _ = try? await c.call(.tlink(dfid: 0, fid: 3, name: "../x"))
            _ = try? await c.walk(0, 6, ["dir", "sub", "..", "..", ".."])
            _ = try? await c.call(.tmknod(dfid: 0, name: "dev", mode: 0o20644, major: 1, minor: 3, gid: 0))
        }),
        ("xattr", 8192, { c in
            try await c.walk(0, 1, ["file"])
            try await c.call(.txattrcreate(fid: 1, name: "user.k", size: 3, flags: 0))
            try await c.write(1, offset: 0, Array("val".utf8))
            try await c.clunk(1)
            try await c.walk(0, 2, ["file"])
            try await c.call(.txattrwalk(fid: 2, newfid: 3, name: "user.k"))
            _ = try await c.read(3)
            try await c.call(.txattrwalk(fid: 2, newfid: 4, name: ""))
            _ = try await c.read(4)
        }),
        ("locks", 8192, { c in
            try await c.walk(0, 1, ["file"])
            try await c.lopen(1, P9.OpenFlags.rdwr)
            let l = P9Lock(type: P9.LockType.wrlck, flags: 1, start: 0, length: 0, procID: 42, clientID: "guest")
            try await c.call(.tlock(fid: 1, lock: l))
            try await c.call(.tgetlock(fid: 1, lock: l))
            var u = l
            u.type = P9.LockType.unlck
            try await c.call(.tlock(fid: 1, lock: u))
        }),
        ("flush-legacy", 8192, { c in
            try await c.walk(0, 1, ["file"])
            try await c.lopen(1)
            let (tag, r) = c.send(.tread(fid: 1, offset: 0, count: 100))
            _ = try? await c.flush(tag).get()
            _ = try? await r.get()
            try await c.walk(0, 2, ["dir", "inner"])
            try await c.call(.trename(fid: 2, dfid: 0, name: "moved"))
            try await c.call(.tremove(fid: 2))
            try await c.sendRaw([19, 0, 0, 0, 102, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        }),
        ("small-msize", 4096, { c in
            try await c.walk(0, 1, ["file"])
            try await c.lopen(1)
            _ = try await c.read(1, count: 1 << 20)
            try await c.walk(0, 2, [])
            try await c.lopen(2, P9.OpenFlags.directory)
            _ = try await c.readdir(2, offset: 0, count: 1 << 20)
        }),
        // Hostile floods, within what the fuzz target's small SessionLimits allow: fids walked to
        // one file, pending xattr values past their budget, ".." runs, pipelined reads.
        ("budgets", 65536, { c in
            for i in 1...300 { _ = try? await c.walk(0, UInt32(i), ["file"]) }
            for i in 1...6 { _ = try? await c.call(.txattrcreate(fid: UInt32(i), name: "user.big", size: 65536, flags: 0)) }
            _ = try? await c.write(1, offset: 0, Array(repeating: 0x61, count: 1000))
            for i in 1...70 { _ = try? await c.walk(0, UInt32(1000 + i), ["dir", "sub", "..", "..", "dir", "..", "rel"]) }
            for i in 1...300 { _ = try? await c.clunk(UInt32(i)) }
        }),
        // Zero copy (Tzc) into the fuzz target's fake guest RAM (Plan9Fuzz.guestRAMLow/Size): good
        // requests, then hostile page lists, each answered with an error.
        ("zero-copy", 1 << 20, { c in
            typealias Op = P9ZeroCopyRequest.Op
            func tzc(_ op: UInt8, _ fid: UInt32, count: UInt32, first: UInt32 = 0, _ pages: [UInt64],
                     declared: UInt32? = nil) async {
                _ = try? await c.call(.tzc(P9ZeroCopyRequest(op: op, fid: fid, offset: 0, count: count, first: first,
                                                              pages: pages, declaredPages: declared)))
            }
            let high: UInt64 = 1 << 32
            try await c.walk(0, 1, ["file"])
            try await c.lopen(1, P9.OpenFlags.rdwr)
            await tzc(Op.read, 1, count: 6000, first: 100, [0x1000, high + 0x2000])
            await tzc(Op.write, 1, count: 5000, [0x3000, 0x4000])
            try await c.walk(0, 2, ["dir"])
            try await c.lopen(2, P9.OpenFlags.directory)
            await tzc(Op.readdir, 2, count: 4096, [0x5000])
            await tzc(Op.read, 1, count: 100, [0x10000])             // the hole
            await tzc(Op.read, 1, count: 100, [high + 0x10000])      // past the end
            await tzc(Op.write, 1, count: 8192, [UInt64.max & ~0xFFF, 0])  // wraps around
            await tzc(Op.read, 1, count: 0, [])
            await tzc(Op.read, 1, count: .max, [0x1000])
            await tzc(Op.read, 1, count: 100, [0x1000], declared: .max)
            await tzc(Op.read, 1, count: 8192, [0x1000])
            await tzc(Op.read, 1, count: 100, [0x1001])
            await tzc(Op.read, 1, count: 100, first: 5000, [0x1000, 0x2000])
            await tzc(Op.read, 1, count: 4096, Array(repeating: 0x1000, count: 300))
        }),
        ("read-flood", 65536, { c in
            try await c.walk(0, 1, ["file"])
            try await c.lopen(1)
            let replies = (0..<200).map { i in c.send(.tread(fid: 1, offset: UInt64(i), count: 65536)).reply }
            for r in replies { _ = try? await r.get() }
        }),
    ]

    @Test(.enabled(if: ProcessInfo.processInfo.environment["UVM_9P_WRITE_CORPUS"] != nil, "regenerates the seed corpus: only with UVM_9P_WRITE_CORPUS set"))
    func writeSeedCorpus() async throws {
        try FileManager.default.createDirectory(atPath: Self.corpusDir, withIntermediateDirectories: true)
        for (name, msize, session) in Self.sessions {
            let fx = try Fixture(guestMemory: Self.memory) { share, outside in
                try? FileManager.default.removeItem(atPath: share)
                try? FileManager.default.removeItem(atPath: outside)
                Plan9Fuzz.populate(share: share, outside: outside)
            }
            let (c, _) = try await fx.connectRaw()
            c.startRecording()
            _ = try await c.version(msize: msize)
            try await c.attach(fid: 0)
            try await session(c)
            try Data(c.recorded).write(to: URL(fileURLWithPath: Self.corpusDir + "/seed-" + name))
            await fx.close()
        }
    }

    @Test func corpusRunsCleanThroughTheFuzzTarget() throws {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: Self.corpusDir)) ?? []
        for f in files where !f.hasPrefix(".") {
            let data = try Data(contentsOf: URL(fileURLWithPath: Self.corpusDir + "/" + f))
            _ = data.withUnsafeBytes { Plan9Fuzz.testOneInput($0) }
        }
        #expect(files.contains { $0.hasPrefix("seed-") })
    }
}
