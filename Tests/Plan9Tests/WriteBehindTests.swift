import CPlan9
import Foundation
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import Plan9

/// WriteBehind: a large guest write starts the host's write-out of what it wrote, on the pool and
/// bounded; small writes are left to the page cache.
@Suite("Write-behind", .serialized)
struct WriteBehindTests {
    /// What the flush was asked: (inode, offset, count).
    final class Asked: Sendable {
        let calls = Mutex<[(ino: UInt64, offset: Int64, count: Int)]>([])
        var all: [(ino: UInt64, offset: Int64, count: Int)] { calls.withLock { $0 } }
    }

    static func session(_ fx: Fixture, _ wb: WriteBehind) -> Plan9Session {
        let s = Plan9Session(core: fx.server.core, memory: ZeroCopyTests.memory, writeBehind: wb)
        _ = s.version(msize: P9.zeroCopyMaxMsize, version: P9String(P9.version))
        let attached = s.handle(.tattach(fid: 0, afid: P9.noFid, uname: P9String("u"), aname: P9String(""), nUname: 0))
        if case .rattach = attached {} else { Issue.record("attach: \(attached)") }
        return s
    }

    static func created(_ m: P9Message) -> Bool {
        if case .rlcreate = m { return true }
        return false
    }

    static func eventually(_ cond: () -> Bool) async throws {
        let deadline = Date().addingTimeInterval(30)
        while !cond(), Date() < deadline { try await Task.sleep(for: .milliseconds(10)) }
    }

    @Test func largeWritesStartTheirWriteOutAndSmallOnesDoNot() async throws {
        let fx = try Fixture(guestMemory: ZeroCopyTests.memory)
        defer { Task { await fx.close() } }
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        defer { pool.shutdownGracefully { _ in } }
        let asked = Asked()
        let wb = WriteBehind(pool: pool) { fd, offset, count in
            var st = stat()
            fstat(fd.raw, &st)
            asked.calls.withLock { $0.append((UInt64(st.st_ino), Int64(offset), count)) }
        }
        let s = Self.session(fx, wb)
        #expect(s.handle(.twalk(fid: 0, newfid: 1, names: [])) == .rwalk(qids: []))
        #expect(Self.created(s.handle(.tlcreate(fid: 1, name: P9String("big"), flags: P9.OpenFlags.rdwr, mode: 0o644, gid: 0))))
        let ino = UInt64(try lstatOf(fx.share + "/big").st_ino)

        // Copied: 512 KiB at 1 MiB, then 4 KiB.
        let big = ByteBuffer(repeating: 0x61, count: 512 * 1024)
        #expect(s.handle(.twrite(fid: 1, offset: 1 << 20, data: big)) == .rwrite(count: 512 * 1024))
        #expect(s.handle(.twrite(fid: 1, offset: 0, data: ByteBuffer(repeating: 0x62, count: 4096))) == .rwrite(count: 4096))
        // Zero copy: 64 pages (the fake RAM's 16 low pages, four times over) at 4 MiB.
        ZeroCopyTests.fill(at: 0, Array(repeating: 0x63, count: 65536))
        let pages = (0..<64).map { UInt64($0 % 16) * 4096 }
        let zc = s.handle(ZeroCopyTests.tzc(P9ZeroCopyRequest.Op.write, fid: 1, offset: 4 << 20, count: 64 * 4096, pages: pages))
        #expect(zc == .rwrite(count: 64 * 4096))

        try await Self.eventually { asked.all.count >= 2 }
        try await Task.sleep(for: .milliseconds(100))  // and nothing for the small write
        let got = asked.all.sorted { $0.offset < $1.offset }
        #expect(got.count == 2)
        #expect(got.map(\.ino) == [ino, ino])
        #expect(got.map(\.offset) == [1 << 20, 4 << 20])
        #expect(got.map(\.count) == [512 * 1024, 64 * 4096])
        #expect(try lstatOf(fx.share + "/big").st_size == (4 << 20) + 64 * 4096)
        s.close()
    }

    /// A slow disk (a flush that does not return) holds at most `limit` hints; the rest are dropped,
    /// not queued, and hints are taken again once those are done.
    @Test func pendingHintsAreBounded() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let pool = NIOThreadPool(numberOfThreads: 8)
        pool.start()
        defer { pool.shutdownGracefully { _ in } }
        let asked = Asked()
        let release = Mutex(false)
        let wb = WriteBehind(pool: pool, limit: 3) { fd, offset, count in
            asked.calls.withLock { $0.append((0, Int64(offset), count)) }
            while !release.withLock({ $0 }) { usleep(1000) }
        }
        let s = Self.session(fx, wb)
        #expect(s.handle(.twalk(fid: 0, newfid: 1, names: [])) == .rwalk(qids: []))
        #expect(Self.created(s.handle(.tlcreate(fid: 1, name: P9String("f"), flags: P9.OpenFlags.rdwr, mode: 0o644, gid: 0))))
        let chunk = ByteBuffer(repeating: 0x61, count: WriteBehind.threshold)
        for i in 0..<10 {
            #expect(s.handle(.twrite(fid: 1, offset: UInt64(i * WriteBehind.threshold), data: chunk)) == .rwrite(count: UInt32(WriteBehind.threshold)))
        }
        try await Self.eventually { asked.all.count >= 3 }
        try await Task.sleep(for: .milliseconds(100))
        #expect(asked.all.count == 3)
        release.withLock { $0 = true }
        try await Task.sleep(for: .milliseconds(100))
        #expect(s.handle(.twrite(fid: 1, offset: 0, data: chunk)) == .rwrite(count: UInt32(WriteBehind.threshold)))
        try await Self.eventually { asked.all.count >= 4 }
        #expect(asked.all.count == 4)
        s.close()
    }

    /// The real write-out on a real file: the call is accepted (a wrong flag or range would be
    /// EINVAL) and the data stays intact.
    @Test func theHostCallIsAccepted() throws {
        let fx = try Fixture()
        let path = fx.share + "/real"
        let fd = open(path, O_CREAT | O_RDWR, 0o644)
        #expect(fd >= 0)
        defer { close(fd) }
        let data = [UInt8](repeating: 0x7a, count: 1 << 20)
        #expect(pwrite(fd, data, data.count, 0) == data.count)
        #expect(cp9_write_behind(fd, 0, Int64(data.count)) == 0)
        #expect(fsync(fd) == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(data))
    }
}
