import NIOCore

/// The server side of a session (uvmd for `uvm`, uvm-init for uvmd): the first frame is the
/// request, the rest are handed on as a stream.
public enum FrameSession {
    public typealias Outbound = NIOAsyncChannelOutboundWriter<Frame>

    /// Serves one session. After `body` returns (having written its final frame) it waits for the
    /// peer to close: closing first would reset the stream (or the socket) and drop whatever flow
    /// control still holds back, the exit frame included.
    /// `alreadyRead`: the request, when whoever routed the session has taken it off the channel.
    public static func serve(
        _ channel: NIOAsyncChannel<Frame, Frame>,
        alreadyRead: Frame? = nil,
        _ body: @Sendable (_ request: Frame, _ rest: AsyncStream<Frame>, _ outbound: Outbound) async throws -> Void
    ) async throws {
        try await channel.executeThenClose { inbound, outbound in
            // Bounded: a body that reads slowly (a process not reading its stdin, a slow server
            // behind a forwarded port) holds the peer back through flow control.
            let queue = FrameQueue(limit: 4 << 20)
            let rest = AsyncStream<Frame>(unfolding: { await queue.take() })
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    defer { queue.finish() }
                    for try await frame in inbound { await queue.put(frame) }
                }
                var frames = rest.makeAsyncIterator()
                let first: Frame
                if let alreadyRead {
                    first = alreadyRead
                } else {
                    guard let next = await frames.next() else { return }
                    first = next
                }
                do {
                    try await body(first, rest, outbound)
                } catch {
                    queue.discard()
                    throw error
                }
                // Nobody reads `rest` any more: what still comes until the peer closes is dropped.
                queue.discard()
                try await group.waitForAll()
            }
        }
    }
}
