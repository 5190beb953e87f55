import NIOCore
import NIOHTTP2
import NIOHPACK

/// Sessions between uvmd and uvm-init are HTTP/2 streams over one virtio-serial port: HTTP/2 gives
/// us many concurrent sessions with per-stream flow control, so one chatty `uvm exec` cannot starve
/// another. Inside a stream, our `Frame`s travel in DATA frames.
public enum HTTP2Sessions {
    public typealias Session = NIOAsyncChannel<Frame, Frame>

    /// Settings for a link that is a private point-to-point pipe: big windows and frames, since
    /// round trips through virtio-serial (under TCG especially) are expensive.
    public static var configuration: NIOHTTP2Handler.Configuration {
        var c = NIOHTTP2Handler.Configuration()
        c.connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 4096),
            HTTP2Setting(parameter: .initialWindowSize, value: 4 << 20),
            HTTP2Setting(parameter: .maxFrameSize, value: 1 << 20),
        ]
        c.connection.targetWindowSize = 16 << 20
        c.stream.targetWindowSize = 4 << 20
        c.stream.outboundBufferSizeHighWatermark = 1 << 20
        c.stream.outboundBufferSizeLowWatermark = 256 << 10
        // Every session ends one stream; a busy CLI loop opens thousands a minute.
        c.stream.streamResetFrameRateLimit.maximumCount = 100_000
        c.stream.streamErrorRateLimit.maximumCount = 100_000
        c.connection.controlFrameRateLimit.maximumCount = 100_000
        return c
    }

    /// Turns a new stream channel into a session channel carrying frames.
    @Sendable
    public static func initializeStream(_ channel: Channel, isClient: Bool) -> EventLoopFuture<Session> {
        channel.eventLoop.makeCompletedFuture {
            try addFraming(channel, isClient: isClient)
            return try Session(wrappingChannelSynchronously: channel)
        }
    }

    /// Frames in and out of a stream channel, for handlers that serve it in the event loop.
    public static func addFraming(_ channel: Channel, isClient: Bool) throws {
        try channel.pipeline.syncOperations.addHandler(StreamFramer(isClient: isClient))
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder()))
    }

    /// The guest side, when each stream is routed in the event loop: `route` gets every new
    /// stream channel (framed) and installs what serves it, a handler or a `Session` handed to a
    /// task. A session that can be served in the event loop (a forwarded connection) then costs
    /// no task and no thread hop, which under emulation is most of its latency.
    public static func configureRoutedServer(
        _ channel: Channel, route: @escaping @Sendable (Channel) throws -> Void
    ) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                mode: .server, connectionConfiguration: configuration.connection,
                streamConfiguration: configuration.stream
            ) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try addFraming(stream, isClient: false)
                    try route(stream)
                }
            }
        }
    }

    /// The host side: opens sessions towards the guest.
    public typealias ClientMultiplexer = NIOHTTP2Handler.AsyncStreamMultiplexer<Session>

    public static func configureClient(_ channel: Channel) -> EventLoopFuture<ClientMultiplexer> {
        channel.configureAsyncHTTP2Pipeline(mode: .client, configuration: configuration) { stream in
            initializeStream(stream, isClient: true)
        }
    }

    public static func configureServer(_ channel: Channel) -> EventLoopFuture<ClientMultiplexer> {
        channel.configureAsyncHTTP2Pipeline(mode: .server, configuration: configuration) { stream in
            initializeStream(stream, isClient: false)
        }
    }

    public static func openSession(_ mux: ClientMultiplexer) async throws -> Session {
        try await mux.openStream { initializeStream($0, isClient: true) }
    }
}

/// Frames <-> DATA frames of one stream. The side that sends a final frame (exit, error, response)
/// sets END_STREAM on it; the client answers the server's END_STREAM with its own, so that streams
/// close cleanly instead of by RST_STREAM.
final class StreamFramer: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = Frame
    typealias OutboundOut = HTTP2Frame.FramePayload

    private let isClient: Bool
    private var headersSent = false
    private var endSent = false

    init(isClient: Bool) { self.isClient = isClient }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes: ByteBuffer? = nil
        var remoteEnded = false
        switch self.unwrapInboundIn(data) {
        case .data(let d):
            if case .byteBuffer(let b) = d.data, b.readableBytes > 0 { bytes = b }
            remoteEnded = d.endStream
        case .headers(let h):
            remoteEnded = h.endStream
        default:
            break
        }
        // Pass the data on first, then answer END_STREAM in the same event-loop turn: the answer
        // may close the stream at once (when this read came from the stream's backlog after a
        // slow reader caught up), and the final frame must be in the reader's buffer by then.
        // No reader can close the stream in between (that takes a turn of this loop), so the
        // stream still closes cleanly, not by reset.
        if let bytes { context.fireChannelRead(self.wrapInboundOut(bytes)) }
        if remoteEnded && self.isClient && !self.endSent {
            self.sendHeadersIfNeeded(context: context)
            self.endSent = true
            let end = HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))
            context.writeAndFlush(self.wrapOutboundOut(end), promise: nil)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = self.unwrapOutboundIn(data)
        guard !self.endSent else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        self.sendHeadersIfNeeded(context: context)
        var bytes = context.channel.allocator.buffer(capacity: Frame.headerSize + frame.payload.readableBytes)
        bytes.writeFrame(frame)
        let end = frame.kind.isFinal
        if end { self.endSent = true }
        context.write(self.wrapOutboundOut(.data(.init(data: .byteBuffer(bytes), endStream: end))), promise: promise)
    }

    private func sendHeadersIfNeeded(context: ChannelHandlerContext) {
        guard !self.headersSent else { return }
        self.headersSent = true
        let headers: HPACKHeaders = self.isClient
            ? [":method": "POST", ":scheme": "uvm", ":authority": "guest", ":path": "/session"]
            : [":status": "200"]
        context.write(self.wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
    }
}
