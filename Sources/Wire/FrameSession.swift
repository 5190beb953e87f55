import NIOCore

/// The server side of a session (uvmd for `uvm`, uvm-init for uvmd): the first frame is the
/// request, the rest are handed on as a stream.
public enum FrameSession {
    public typealias Outbound = NIOAsyncChannelOutboundWriter<Frame>

    /// Serves one session. After `body` returns (having written its final frame) it waits for the
    /// peer to close: closing first would reset the stream (or the socket) and drop whatever flow
    /// control still holds back, the exit frame included.
    public static func serve(
        _ channel: NIOAsyncChannel<Frame, Frame>,
        _ body: @Sendable (_ request: Frame, _ rest: AsyncStream<Frame>, _ outbound: Outbound) async throws -> Void
    ) async throws {
        try await channel.executeThenClose { inbound, outbound in
            let (rest, restInput) = AsyncStream.makeStream(of: Frame.self)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    defer { restInput.finish() }
                    for try await frame in inbound { restInput.yield(frame) }
                }
                var frames = rest.makeAsyncIterator()
                guard let first = await frames.next() else { return }
                try await body(first, rest, outbound)
                try await group.waitForAll()
            }
        }
    }
}
