import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

public enum Plan9ClientError: Error, Equatable {
    /// The connection closed before the reply came.
    case closed
    /// Tflush was answered before this request's reply: the request was dropped.
    case flushed
    case malformedReply(String)
    /// No reply within the time allowed: the connection is closed (the server's state is unknown).
    case timedOut
}

/// A pipelining 9P2000.L client: tags, out-of-order replies, Tflush. uvm's FUSE mount (`uvm
/// mount`) speaks to the guest with it, so the server's replies are untrusted: they are decoded
/// with bounds checks, framed within P9.maxMsize, and in `strict` mode a reply to no outstanding
/// request closes the connection; `call(_:timeout:)` never waits unbounded. Tests, fuzz-corpus
/// capture and benchmarks use it too.
public final class Plan9Client: Sendable {
    public let channel: Channel
    private let state: ClientState

    init(channel: Channel, state: ClientState) {
        self.channel = channel
        self.state = state
    }

    /// Over a connected stream socket (one end of a socketpair); takes ownership of `fd`.
    public static func connect(socket fd: CInt,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> Plan9Client {
        let state = ClientState()
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try Self.addHandlers(ch, state) } }
            .withConnectedSocket(fd).get()
        return Plan9Client(channel: channel, state: state)
    }

    public static func connect(unixSocketPath: String,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> Plan9Client {
        let state = ClientState()
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try Self.addHandlers(ch, state) } }
            .connect(unixDomainSocketPath: unixSocketPath).get()
        return Plan9Client(channel: channel, state: state)
    }

    public static func connect(host: String, port: Int,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> Plan9Client {
        let state = ClientState()
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try Self.addHandlers(ch, state) } }
            .connect(host: host, port: port).get()
        return Plan9Client(channel: channel, state: state)
    }

    /// Over a unix socket whose bytes pass through `transport` first (handlers that turn the
    /// socket's own framing into a plain 9P byte stream, e.g. uvmd's session frames). Strict: a
    /// stray reply ends the connection, and nothing sent or received is kept for inspection.
    /// Takes ownership of `socket`, a connected stream socket.
    public static func connect(socket fd: CInt, transport: @escaping @Sendable () -> [any ChannelHandler],
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) -> EventLoopFuture<Plan9Client> {
        let state = ClientState(strict: true)
        return ClientBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandlers(transport())
                    try Self.addHandlers(ch, state)
                }
            }
            .withConnectedSocket(fd)
            .map { Plan9Client(channel: $0, state: state) }
    }

    /// The reply to `message` (Rlerror included), waiting at most `timeout`: after that the
    /// request fails with `.timedOut` and the connection is closed, since a server that did not
    /// answer may still act on it. Blocks the calling thread: never call it on an event loop.
    public func call(_ message: P9Message, timeout: TimeAmount) throws -> P9Message {
        let (tag, reply) = send(message)
        let state = self.state, channel = self.channel
        let timer = channel.eventLoop.scheduleTask(in: timeout) {
            if let p = state.take(tag) {
                p.fail(Plan9ClientError.timedOut)
                channel.close(promise: nil)
            }
        }
        defer { timer.cancel() }
        return try reply.wait()
    }

    /// Sends `message` and forgets the reply (Tclunk of a fid no longer used).
    public func sendIgnoringReply(_ message: P9Message) {
        _ = send(message)
    }

    private static func addHandlers(_ channel: Channel, _ state: ClientState) throws {
        try channel.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(P9FrameDecoder(maxFrameSize: Int(P9.maxMsize))),
            ClientHandler(state: state),
        ])
    }

    /// Sends a request; the future completes with its reply (Rlerror included). `tag` nil picks a
    /// free one.
    @discardableResult
    public func send(_ message: P9Message, tag: UInt16? = nil) -> (tag: UInt16, reply: EventLoopFuture<P9Message>) {
        let promise = channel.eventLoop.makePromise(of: P9Message.self)
        let t = state.register(promise, tag: tag)
        var buffer = channel.allocator.buffer(capacity: 64)
        P9Frame(tag: t, message: message).encode(into: &buffer)
        state.record(buffer)
        channel.writeAndFlush(buffer).whenFailure { error in
            if let p = self.state.take(t) { p.fail(error) }
        }
        return (t, promise.futureResult)
    }

    /// Sends Tflush for `oldtag`. If Rflush arrives while `oldtag` is still unanswered, that request
    /// fails with `.flushed` (its reply must then never come).
    @discardableResult
    public func flush(_ oldtag: UInt16) -> EventLoopFuture<P9Message> {
        let promise = channel.eventLoop.makePromise(of: P9Message.self)
        let t = state.register(promise, tag: nil, flushing: oldtag)
        var buffer = channel.allocator.buffer(capacity: 16)
        P9Frame(tag: t, message: .tflush(oldtag: oldtag)).encode(into: &buffer)
        state.record(buffer)
        channel.writeAndFlush(buffer, promise: nil)
        return promise.futureResult
    }

    /// The reply, or P9Errno for Rlerror.
    @discardableResult
    public func call(_ message: P9Message) async throws -> P9Message {
        let reply = try await send(message).reply.get()
        if case .rlerror(let e) = reply { throw P9Errno(Int32(bitPattern: e)) }
        return reply
    }

    /// Raw bytes, for hostile-input tests.
    public func sendRaw(_ bytes: [UInt8]) async throws {
        let buffer = channel.allocator.buffer(bytes: bytes)
        state.record(buffer)
        try await channel.writeAndFlush(buffer).get()
    }

    /// Keeps a copy of every byte sent from now on (to capture real traffic as fuzz seeds).
    public func startRecording() { state.setRecording(true) }

    /// The change notes pushed since the last call (after Tuvmnotify).
    public func takeNotes() -> [P9Note] { state.takeNotes() }
    /// The bytes sent since `startRecording()`.
    public var recorded: [UInt8] { state.recordedSnapshot }

    /// Tags in the order their replies arrived.
    public var arrivals: [UInt16] { state.arrivalsSnapshot }
    /// Replies for tags that were not outstanding (a server bug: e.g. a reply after Rflush).
    public var unexpectedReplies: [P9Frame] { state.unexpectedSnapshot }

    public func close() async {
        try? await channel.close()
    }

    // Conveniences for the common sequence.

    public func version(msize: UInt32 = P9.maxMsize) async throws -> UInt32 {
        let r = try await send(.tversion(msize: msize, version: P9String(P9.version)), tag: P9.noTag).reply.get()
        guard case .rversion(let m, let v) = r, v.bytes == Array(P9.version.utf8) else {
            throw Plan9ClientError.malformedReply("\(r)")
        }
        return m
    }

    @discardableResult
    public func attach(fid: UInt32, uname: String = "root", nUname: UInt32 = 0) async throws -> Qid {
        let r = try await call(.tattach(fid: fid, afid: P9.noFid, uname: P9String(uname), aname: "", nUname: nUname))
        guard case .rattach(let q) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return q
    }
}

final class ClientState: @unchecked Sendable {
    /// Product use: stray replies are a protocol error, and arrivals are not recorded.
    let strict: Bool
    init(strict: Bool = false) { self.strict = strict }
    private let lock = NIOLock()
    private var pending: [UInt16: EventLoopPromise<P9Message>] = [:]
    private var flushTargets: [UInt16: UInt16] = [:]
    private var nextTag: UInt16 = 0
    private var arrivals: [UInt16] = []
    private var unexpected: [P9Frame] = []
    private var recording = false
    private var sent: [UInt8] = []
    /// Change notes the server pushed (Ruvmnotify, tag NOTAG), oldest first, at most 4096 kept.
    private var notes: [P9Note] = []

    func received(notes more: [P9Note]) {
        lock.withLock {
            notes += more
            if notes.count > 4096 { notes.removeFirst(notes.count - 4096) }
        }
    }
    func takeNotes() -> [P9Note] { lock.withLock { defer { notes = [] }; return notes } }

    func setRecording(_ on: Bool) { lock.withLock { recording = on } }
    func record(_ b: ByteBuffer) {
        lock.withLock { if recording { sent += b.readableBytesView } }
    }
    var recordedSnapshot: [UInt8] { lock.withLock { sent } }

    func register(_ p: EventLoopPromise<P9Message>, tag: UInt16?, flushing: UInt16? = nil) -> UInt16 {
        lock.withLock {
            var t: UInt16
            if let tag {
                t = tag
            } else {
                repeat {
                    t = nextTag
                    nextTag = nextTag &+ 1
                } while t == P9.noTag || pending[t] != nil
            }
            pending[t] = p
            if let flushing { flushTargets[t] = flushing }
            return t
        }
    }

    func take(_ tag: UInt16) -> EventLoopPromise<P9Message>? {
        lock.withLock { pending.removeValue(forKey: tag) }
    }

    /// Returns the promise for a reply and, for an Rflush, the promise of the flushed request if
    /// that one is still unanswered.
    func received(_ frame: P9Frame) -> (EventLoopPromise<P9Message>?, EventLoopPromise<P9Message>?) {
        lock.withLock {
            if !strict { arrivals.append(frame.tag) }
            guard let p = pending.removeValue(forKey: frame.tag) else {
                if !strict { unexpected.append(frame) }
                return (nil, nil)
            }
            var flushed: EventLoopPromise<P9Message>?
            if let old = flushTargets.removeValue(forKey: frame.tag) {
                flushed = pending.removeValue(forKey: old)
            }
            return (p, flushed)
        }
    }

    func failAll(_ error: any Error) {
        let all: [EventLoopPromise<P9Message>] = lock.withLock {
            let v = Array(pending.values)
            pending.removeAll()
            return v
        }
        for p in all { p.fail(error) }
    }

    var arrivalsSnapshot: [UInt16] { lock.withLock { arrivals } }
    var unexpectedSnapshot: [P9Frame] { lock.withLock { unexpected } }
}

final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let state: ClientState

    init(state: ClientState) { self.state = state }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame: P9Frame
        do {
            frame = try P9Frame.decode(unwrapInboundIn(data))
        } catch {
            state.failAll(Plan9ClientError.malformedReply("\(error)"))
            context.close(promise: nil)
            return
        }
        // A reply must be one: a server (or a peer in between) sending requests is broken.
        guard frame.message.typeCode & 1 == 1 || frame.message.typeCode == 7 else {
            state.failAll(Plan9ClientError.malformedReply("message type \(frame.message.typeCode) is not a reply"))
            context.close(promise: nil)
            return
        }
        if frame.tag == P9.noTag, case .ruvmnotify(let notes) = frame.message {
            state.received(notes: notes)
            return
        }
        let (p, flushed) = state.received(frame)
        if p == nil && state.strict {
            // A reply nobody asked for (or one after a timeout gave its tag up): the stream can
            // no longer be trusted to pair replies with requests.
            state.failAll(Plan9ClientError.malformedReply("reply to tag \(frame.tag), which is not outstanding"))
            context.close(promise: nil)
            return
        }
        flushed?.fail(Plan9ClientError.flushed)
        p?.succeed(frame.message)
    }

    func channelInactive(context: ChannelHandlerContext) {
        state.failAll(Plan9ClientError.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        state.failAll(error)
        context.close(promise: nil)
    }
}
