import CSyscalls
import Glibc
import NIOCore
import NIOPosix
import Wire

/// The guest end of one forwarded connection: connects to the port on the guest's loopback and
/// relays bytes both ways. `stdin` frames carry host->guest bytes and `stdinEOF` the host's
/// half-close; `stdout` frames carry guest->host bytes and `stdoutEOF` the guest's half-close.
/// When both directions are done the session ends with `exit`; a failure ends it with `error`.
///
/// It runs in the event loop of its HTTP/2 stream, the socket on the same loop, as two handlers
/// around one `Relay`: no task, no queue and no thread hop per connection or per chunk. Under TCG
/// those hops were most of a forwarded connection's latency. Flow control: each side reads only
/// while the other can take more (a read is held while the other channel is not writable), so
/// the HTTP/2 stream window holds uvmd back and TCP's window holds the guest server back.
enum PortRelay {
    /// Every relay ends with the same frame: encoded once, not by JSONEncoder per connection.
    static let exitFrame = Frame.json(.exit, ExitStatus(code: 0))

    /// Installs the relay on `stream`, whose request was `connect` to `port`.
    static func start(port: UInt16, stream: Channel) throws {
        let relay = Relay(port: port)
        try stream.pipeline.syncOperations.addHandler(StreamSide(relay))
        // A loopback handshake takes microseconds, so a short synchronous wait for it is far
        // cheaper under TCG than an event-loop connect. Only when the server's backlog is full
        // does it take longer; then the event loop waits for it.
        let fd = uvm_connect_loopback(port, 5)
        if fd >= 0 {
            relay.attach(bootstrap(stream.eventLoop, relay).withConnectedSocket(fd))
        } else if errno == ETIMEDOUT {
            let loop = stream.eventLoop, bound = NIOLoopBound(relay, eventLoop: loop)
            let v4 = bootstrap(loop, relay).connect(host: "127.0.0.1", port: Int(port))
            relay.attach(v4.flatMapError { _ in bootstrap(loop, bound.value).connect(host: "::1", port: Int(port)) })
        } else {
            relay.fail(WireError(.notFound, "nothing accepts connections on port \(port) in the guest: \(String(cString: strerror(errno)))"))
        }
    }

    private static func bootstrap(_ loop: EventLoop, _ relay: Relay) -> ClientBootstrap {
        let bound = NIOLoopBound(relay, eventLoop: loop)
        return ClientBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            // Big reads make big frames: under TCG each frame has a fixed cost, whatever its size.
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(SocketSide(bound.value))
                }
            }
    }

    /// Both ends of one connection; touched only on their shared event loop.
    final class Relay {
        let port: UInt16
        // Weak: the pipelines own their handlers (which hold this relay) and contexts.
        weak var stream: ChannelHandlerContext?
        weak var socket: ChannelHandlerContext?
        weak var streamSide: StreamSide?
        weak var socketSide: SocketSide?
        /// Whether the stream may read: the socket can take more (or nothing will reach it any more).
        var streamMayRead: Bool { ended || (socket?.channel.isWritable ?? false) }
        var socketMayRead: Bool { ended || (stream?.channel.isWritable ?? true) }
        /// Host bytes that came before the socket was connected (the stream holds its reads
        /// until then, so this is what came with the request: one read's worth at most).
        private var pending: [ByteBuffer] = []
        private var hostEOF = false
        /// The socket's output is shut after everything the host sent.
        private var hostDone = false
        private var guestEOF = false
        /// exit or error is sent, or the stream is gone: nothing more goes out.
        private var ended = false

        init(port: UInt16) { self.port = port }

        func attach(_ connecting: EventLoopFuture<Channel>) {
            connecting.assumeIsolated().whenComplete { result in
                switch result {
                case .success(let channel):
                    guard !self.ended, self.socket != nil else {
                        channel.close(promise: nil)
                        return
                    }
                    for bytes in self.pending { self.socket?.write(NIOAny(bytes), promise: nil) }
                    self.pending = []
                    self.socket?.flush()
                    if self.hostEOF { self.shutHostDirection() }
                    self.streamSide?.resume()
                case .failure(let error):
                    self.fail(WireError(.notFound, "nothing accepts connections on port \(self.port) in the guest: \(error)"))
                }
            }
        }

        // Host -> guest.
        func fromHost(_ bytes: ByteBuffer) {
            guard !ended else { return }
            if let socket { socket.write(NIOAny(bytes), promise: nil) } else { pending.append(bytes) }
        }

        func hostEnded() {
            guard !hostEOF else { return }
            hostEOF = true
            if socket != nil { shutHostDirection() }
        }

        /// Half-closes the socket once everything written so far has left: NIO fails the writes
        /// still pending at a half-close, and a slow guest server lost the tail of an upload.
        private func shutHostDirection() {
            guard let socket else { return }
            let channel = socket.channel
            socket.writeAndFlush(NIOAny(ByteBuffer())).assumeIsolated().whenComplete { _ in
                channel.close(mode: .output, promise: nil)
                self.hostDone = true
                self.finishIfDone()
            }
        }

        // Guest -> host.
        func fromGuest(_ bytes: ByteBuffer) {
            guard !ended else { return }
            stream?.write(NIOAny(Frame(.stdout, bytes)), promise: nil)
        }

        func guestEnded() {
            guard !guestEOF, !ended else { return }
            guestEOF = true
            stream?.writeAndFlush(NIOAny(Frame(.stdoutEOF)), promise: nil)
            finishIfDone()
        }

        /// The socket is closed: whatever the host still sends has nowhere to go.
        func socketClosed() {
            guestEnded()
            hostDone = true
            finishIfDone()
        }

        private func finishIfDone() {
            guard hostDone, guestEOF, !ended else { return }
            ended = true
            socket?.close(promise: nil)
            stream?.writeAndFlush(NIOAny(PortRelay.exitFrame), promise: nil)
        }

        func fail(_ error: WireError) {
            socket?.close(promise: nil)
            guard !ended else { return }
            ended = true
            stream?.writeAndFlush(NIOAny(Frame.error(error)), promise: nil)
        }

        /// uvmd dropped the stream (or the link went): abort the connection.
        func streamGone() {
            ended = true
            stream = nil
            socket?.close(promise: nil)
        }

        /// The ends hold a read while the other cannot take more; NIO's autoRead cannot do this
        /// for an HTTP/2 stream, which does not read again when autoRead is turned back on.
        final class Gate {
            private var held = false
            func read(_ context: ChannelHandlerContext, allowed: Bool) {
                if allowed { context.read() } else { held = true }
            }
            func resume(_ context: ChannelHandlerContext?) {
                guard held, let context else { return }
                held = false
                context.read()
            }
        }
    }

    /// The HTTP/2 stream's end: frames from uvmd.
    final class StreamSide: ChannelDuplexHandler {
        typealias InboundIn = Frame
        typealias OutboundIn = Frame
        let relay: Relay
        private let gate = Relay.Gate()
        init(_ relay: Relay) { self.relay = relay }

        func handlerAdded(context: ChannelHandlerContext) {
            relay.stream = context
            relay.streamSide = self
        }

        func read(context: ChannelHandlerContext) { gate.read(context, allowed: relay.streamMayRead) }
        func resume() { gate.resume(relay.stream) }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            switch frame.kind {
            case .stdin: relay.fromHost(frame.payload)
            case .stdinEOF: relay.hostEnded()
            default: break
            }
        }

        func channelReadComplete(context: ChannelHandlerContext) { relay.socket?.flush() }

        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if context.channel.isWritable { relay.socketSide?.resume() }
        }

        func channelInactive(context: ChannelHandlerContext) { relay.streamGone() }

        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }

    /// The guest socket's end.
    final class SocketSide: ChannelDuplexHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundIn = ByteBuffer
        let relay: Relay
        private let gate = Relay.Gate()
        init(_ relay: Relay) { self.relay = relay }

        func handlerAdded(context: ChannelHandlerContext) {
            relay.socket = context
            relay.socketSide = self
        }

        func read(context: ChannelHandlerContext) { gate.read(context, allowed: relay.socketMayRead) }
        func resume() { gate.resume(relay.socket) }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { relay.fromGuest(unwrapInboundIn(data)) }

        func channelReadComplete(context: ChannelHandlerContext) { relay.stream?.flush() }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .some(ChannelEvent.inputClosed) = event as? ChannelEvent { relay.guestEnded() }
        }

        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if context.channel.isWritable { relay.streamSide?.resume() }
        }

        func channelInactive(context: ChannelHandlerContext) { relay.socketClosed() }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            relay.fail(WireError(.internalError, "port \(relay.port) in the guest: \(error)"))
        }
    }
}
