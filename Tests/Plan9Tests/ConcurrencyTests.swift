import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import Plan9

/// Holds chosen requests on the pool thread until released, so tests decide what is in flight.
final class Gate: @unchecked Sendable {
    private let cond = ConditionLock(value: 0)
    private let lock = NIOLock()
    private var held: Set<UInt16> = []
    private var arrived: Set<UInt16> = []

    init(holding tags: Set<UInt16>) { held = tags }

    var hook: @Sendable (UInt16, P9Message) -> Void {
        { tag, _ in self.pass(tag) }
    }

    private func pass(_ tag: UInt16) {
        let hold = lock.withLock { () -> Bool in
            guard held.contains(tag) else { return false }
            arrived.insert(tag)
            return true
        }
        guard hold else { return }
        cond.lock(whenValue: 1)
        cond.unlock()
    }

    func hasArrived(_ tag: UInt16) -> Bool { lock.withLock { arrived.contains(tag) } }

    func waitArrived(_ tag: UInt16) async {
        while !hasArrived(tag) { try? await Task.sleep(nanoseconds: 1_000_000) }
    }

    func release() {
        cond.lock()
        cond.unlock(withValue: 1)
    }
}

@Suite("Concurrency")
struct ConcurrencyTests {
    @Test func manyRequestsInFlightAnsweredOutOfOrder() async throws {
        let gate = Gate(holding: [1000])
        let fx = try Fixture(gate: gate) { share, _ in
            for i in 0..<50 { try write(share + "/f\(i)", "\(i)") }
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        // Tag 1000 is held on its pool thread; everything sent after it is answered first.
        let (_, slow) = c.send(.tgetattr(fid: 0, mask: P9.GetattrMask.all), tag: 1000)
        await gate.waitArrived(1000)
        var fast: [EventLoopFuture<P9Message>] = []
        for i in 0..<50 {
            fast.append(c.send(.twalk(fid: 0, newfid: UInt32(100 + i), names: [P9String("f\(i)")]), tag: UInt16(i)).reply)
        }
        for f in fast {
            guard case .rwalk(let q) = try await f.get() else { Issue.record("walk"); return }
            #expect(q.count == 1)
        }
        #expect(!c.arrivals.contains(1000))
        gate.release()
        guard case .rgetattr = try await slow.get() else { Issue.record("getattr"); return }
        #expect(c.arrivals.last == 1000)
        // All 50 new fids work, in parallel.
        let reads = (0..<50).map { i in c.send(.tgetattr(fid: UInt32(100 + i), mask: P9.GetattrMask.basic)).reply }
        for r in reads {
            guard case .rgetattr = try await r.get() else { Issue.record("getattr"); return }
        }
        #expect(c.unexpectedReplies.isEmpty)
    }

    @Test func flushOfARunningRequestAnswersItFirst() async throws {
        let gate = Gate(holding: [7])
        let fx = try Fixture(gate: gate)
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        let before = c.arrivals.count
        let (_, original) = c.send(.tgetattr(fid: 0, mask: P9.GetattrMask.all), tag: 7)
        await gate.waitArrived(7)
        let flush = c.flush(7)
        try await Task.sleep(nanoseconds: 50_000_000)
        #expect(c.arrivals.count == before)  // Rflush must wait for the reply
        gate.release()
        guard case .rgetattr = try await original.get() else { Issue.record("original"); return }
        #expect(try await flush.get() == .rflush)
        #expect(c.arrivals.suffix(2).first == 7)
        #expect(c.unexpectedReplies.isEmpty)
    }

    @Test func flushOfAQueuedRequestDropsIt() async throws {
        // One pool thread, held by tag 1: tag 2 queues behind it and is flushed before it starts.
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let gate = Gate(holding: [1])
        let fx = try Fixture(threadPool: pool, gate: gate) { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close(); try? await pool.shutdownGracefully() } }
        let c = try await fx.connect()
        let (_, first) = c.send(.tgetattr(fid: 0, mask: P9.GetattrMask.all), tag: 1)
        await gate.waitArrived(1)
        // A walk that would create fid 9: flushed, so fid 9 must never exist.
        let (_, queued) = c.send(.twalk(fid: 0, newfid: 9, names: ["f"]), tag: 2)
        let flush = c.flush(2)
        #expect(try await flush.get() == .rflush)  // answered while the pool is still blocked
        await #expect(throws: Plan9ClientError.flushed) { try await queued.get() }
        gate.release()
        _ = try await first.get()
        // The tag is free again and the flushed walk never ran.
        let again = try await c.send(.tgetattr(fid: 9, mask: P9.GetattrMask.basic), tag: 2).reply.get()
        #expect(again == .rlerror(ecode: UInt32(EBADF)))
        #expect(c.unexpectedReplies.isEmpty)
    }

    @Test func flushStormNeverAnswersAfterRflush() async throws {
        let fx = try Fixture { share, _ in
            try Data(repeating: 1, count: 256 * 1024).write(to: URL(fileURLWithPath: share + "/f"))
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1)
        var originals: [EventLoopFuture<P9Message>] = []
        var flushes: [EventLoopFuture<P9Message>] = []
        for i in 0..<300 {
            let (tag, r) = c.send(.tread(fid: 1, offset: UInt64(i * 512), count: 65536))
            originals.append(r)
            if i % 2 == 0 { flushes.append(c.flush(tag)) }
        }
        for f in flushes { #expect(try await f.get() == .rflush) }
        for o in originals {
            do {
                guard case .rread = try await o.get() else { Issue.record("read"); continue }
            } catch Plan9ClientError.flushed {}
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        #expect(c.unexpectedReplies.isEmpty)  // no reply came after its Rflush
    }

    @Test func parallelClientsOnOneServer() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for n in 0..<8 {
                let c = try await fx.connect()
                group.addTask {
                    try await c.walk(0, 1, [])
                    try await c.lcreate(1, "c\(n)")
                    for i in 0..<50 { try await c.write(1, offset: UInt64(i * 4), Array("\(n)\(n)\(n)\(n)".utf8)) }
                    try await c.clunk(1)
                }
            }
            try await group.waitForAll()
        }
        for n in 0..<8 {
            #expect(try contents(fx.share + "/c\(n)") == String(repeating: "\(n)", count: 200))
        }
    }
}
