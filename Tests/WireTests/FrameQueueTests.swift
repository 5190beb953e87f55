import NIOCore
import Synchronization
import Testing
@testable import Wire

@Suite struct FrameQueueTests {
    static func frame(_ i: Int, size: Int = 1024) -> Frame {
        Frame(.stdin, ByteBuffer(repeating: UInt8(i & 0xff), count: size))
    }

    @Test func producerWaitsForASlowConsumerAndOrderIsKept() async {
        let queue = FrameQueue(limit: 4096)
        let produced = Atomic<Int>(0)
        let producer = Task {
            for i in 0..<20 {
                await queue.put(Self.frame(i))
                produced.add(1, ordering: .relaxed)
            }
            queue.finish()
        }
        for _ in 0..<2000 { await Task.yield() }
        // 4 KiB of 1 KiB frames fit; the one that crosses the limit waits.
        #expect(produced.load(ordering: .relaxed) <= 5)
        var seen: [UInt8] = []
        while let f = await queue.take() { seen.append(f.payload.getInteger(at: f.payload.readerIndex)!) }
        await producer.value
        #expect(seen == (0..<20).map { UInt8($0) })
    }

    @Test func discardReleasesABlockedProducerAndDropsTheRest() async {
        let queue = FrameQueue(limit: 1024)
        let producer = Task {
            for i in 0..<10 { await queue.put(Self.frame(i)) }
        }
        for _ in 0..<1000 { await Task.yield() }
        queue.discard()
        await producer.value
        #expect(await queue.take() == nil)
    }

    @Test func aCancelledConsumerGetsNil() async {
        let queue = FrameQueue(limit: 1024)
        let consumer = Task { await queue.take() }
        for _ in 0..<100 { await Task.yield() }
        consumer.cancel()
        #expect(await consumer.value == nil)
    }
}
