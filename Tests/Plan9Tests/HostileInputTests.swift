import Foundation
import NIOCore
import Testing

@testable import Plan9

@Suite("Hostile input")
struct HostileInputTests {
    /// Each case is sent on its own session after a good Tversion; the session must end, and a
    /// second session opened before it must keep working.
    static let cases: [(String, [UInt8])] = [
        ("unknown type", [7, 0, 0, 0, 250, 1, 0]),
        ("size below header", [3, 0, 0, 0, 100, 0, 0]),
        ("size above msize", [0xFF, 0xFF, 0xFF, 0x7F, 100, 0, 0]),
        ("size above negotiated msize", [0x00, 0x00, 0x01, 0x00] + [UInt8](repeating: 0, count: 65532)),
        ("truncated walk", [13, 0, 0, 0, 110, 1, 0, 0, 0, 0, 0, 1, 0, 0]),
        ("string past end", [20, 0, 0, 0, 110, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0xFF, 0xFF, 0x61]),
        ("walk with 17 names", {
            var b = ByteBuffer()
            P9Frame(tag: 1, message: .twalk(fid: 0, newfid: 1, names: Array(repeating: "a", count: 17))).encode(into: &b)
            return Array(b.readableBytesView)
        }()),
        ("reply type from client", [11, 0, 0, 0, 7, 1, 0, 2, 0, 0, 0]),
        ("trailing bytes", [12, 0, 0, 0, 120, 1, 0, 0, 0, 0, 0, 0]),
    ]

    @Test("malformed message ends only its own session", arguments: 0..<cases.count)
    func malformedMessageEndsSession(_ index: Int) async throws {
        let (name, bytes) = Self.cases[index]
        let fx = try Fixture { share, _ in try write(share + "/f", "ok") }
        defer { Task { await fx.close() } }
        let good = try await fx.connect()
        let (bad, task) = try await fx.connectRaw()
        _ = try await bad.version(msize: 8192)
        try await bad.attach(fid: 0)
        try await bad.sendRaw(bytes)
        // The server closes the session: the channel goes inactive.
        try await withTimeout(seconds: 30, "\(name): session not closed") {
            try await bad.channel.closeFuture.get()
        }
        _ = try? await task.value
        // The other session is unaffected.
        try await good.walk(0, 1, ["f"])
        try await good.lopen(1)
        #expect(try await good.read(1) == Array("ok".utf8), "\(name)")
        // And new sessions are accepted.
        let again = try await fx.connect()
        #expect(try await again.getattr(0).qid.type == P9.QidType.dir)
    }

    @Test func truncatedMessageAtEOFEndsSession() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let (bad, task) = try await fx.connectRaw()
        _ = try await bad.version(msize: 8192)
        try await bad.sendRaw([100, 0, 0, 0, 110, 1, 0, 0])
        try await bad.channel.close(mode: .output)
        try await withTimeout(seconds: 30, "session not closed") { try await task.value }
    }

    @Test func messagesBeforeVersionEndTheSession() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let (bad, _) = try await fx.connectRaw()
        _ = bad.send(.tattach(fid: 0, afid: P9.noFid, uname: "", aname: "", nUname: 0))
        try await withTimeout(seconds: 30, "session not closed") { try await bad.channel.closeFuture.get() }
    }

    @Test func duplicateTagInFlightEndsTheSession() async throws {
        let gate = Gate(holding: [5])
        let fx = try Fixture(gate: gate)
        defer { Task { await fx.close() } }
        let (c, _) = try await fx.connectRaw()
        _ = try await c.version(msize: 8192)
        try await c.attach(fid: 0)
        _ = c.send(.tgetattr(fid: 0, mask: 1), tag: 5)
        await gate.waitArrived(5)
        var b = ByteBuffer()
        P9Frame(tag: 5, message: .tgetattr(fid: 0, mask: 1)).encode(into: &b)
        try await c.sendRaw(Array(b.readableBytesView))
        try await withTimeout(seconds: 30, "session not closed") { try await c.channel.closeFuture.get() }
        gate.release()
    }

    @Test func unsupportedLegacyMessagesGetAnError() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        // Tauth (afid, uname, aname, n_uname): not parsed, answered.
        try await c.sendRaw([7 + 4 + 2 + 2 + 4, 0, 0, 0, 102, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        // Until the answer is in (a fixed pause was too short on a loaded machine).
        for _ in 0..<500 where c.unexpectedReplies.isEmpty { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(c.unexpectedReplies.first?.message == .rlerror(ecode: UInt32(ENOENT)))  // "no auth required"
        // Topen (9P2000) has no place in 9P2000.L.
        try await c.sendRaw([7 + 4 + 1, 0, 0, 0, 112, 4, 0, 0, 0, 0, 0, 0])
        for _ in 0..<500 where c.unexpectedReplies.count < 2 { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(c.unexpectedReplies.last?.message == .rlerror(ecode: UInt32(EOPNOTSUPP)))
        #expect(try await c.getattr(0).qid.type == P9.QidType.dir)
    }
}

struct TimeoutError: Error, CustomStringConvertible {
    var description: String
}

func withTimeout<T: Sendable>(seconds: Double, _ what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(nanoseconds: UInt64(seconds * 1e9))
            throw TimeoutError(description: what)
        }
        let r = try await group.next()!
        group.cancelAll()
        return r
    }
}
