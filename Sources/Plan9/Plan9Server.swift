import CPlan9
import Dispatch
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A host directory exported over 9P2000.L.
public struct Plan9Export: Sendable, Hashable {
    /// The directory the guest sees as the root of the mount.
    public var root: String
    /// Every change is refused with EROFS.
    public var readOnly: Bool
    /// WSL's "metadata": guest uid/gid/mode (and special files the guest creates) are kept in the
    /// `user.uvm.stat` xattr, so chown/chmod persist without privileges on the host.
    public var metadata: Bool
    /// Whose file system rights the server's threads take for every request (nil: the process's).
    /// The guest agent runs as root and serves a distro's files (`uvm mount`) as its default user:
    /// what the host creates is that user's, and the host reaches only what that user may.
    public var identity: Plan9Identity?

    public init(root: String, readOnly: Bool = false, metadata: Bool = false, identity: Plan9Identity? = nil) {
        self.root = root
        self.readOnly = readOnly
        self.metadata = metadata
        self.identity = identity
    }
}

/// A file system identity for the server's threads (setfsuid, setfsgid, setgroups: per thread).
public struct Plan9Identity: Sendable, Hashable {
    public var uid: UInt32
    public var gid: UInt32
    public var groups: [UInt32]
    public init(uid: UInt32, gid: UInt32, groups: [UInt32]) {
        self.uid = uid
        self.gid = gid
        self.groups = Array(groups.prefix(64))
    }

    /// The identity the calling thread has taken, so that a pool thread switches only once.
    private static let adopted = ThreadSpecificVariable<Box>()
    private final class Box: Sendable { let identity: Plan9Identity; init(_ i: Plan9Identity) { identity = i } }

    /// Makes the calling (pool) thread act as this identity; false if the kernel refused.
    func adopt() -> Bool {
        if Self.adopted.currentValue?.identity == self { return true }
        Self.adopted.currentValue = nil
        let rc = groups.withUnsafeBufferPointer { cp9_set_thread_fs_identity(uid, gid, $0.baseAddress, Int32($0.count)) }
        guard rc == 0 else { return false }
        Self.adopted.currentValue = Box(self)
        return true
    }
}

public enum Plan9ServerError: Error, CustomStringConvertible {
    case cannotOpenRoot(String, P9Errno)
    public var description: String {
        switch self {
        case .cannotOpenRoot(let path, let e): return "cannot open export root \(path): \(e)"
        }
    }
}

/// Serves one export to any number of sessions. Each session is one byte stream (unix socket,
/// virtio-serial relay, socketpair, pipe pair); file system calls run on a thread pool so many
/// requests are in flight and answered as they finish.
public final class Plan9Server: Sendable {
    public let export: Plan9Export
    let core: ExportCore
    let threadPool: NIOThreadPool
    private let ownsPool: Bool
    let logger: Logger
    /// What each session may hold and have in flight.
    let limits: SessionLimits
    /// Test hook: runs on the pool thread before each request (by tag) is handled.
    let beforeHandle: (@Sendable (UInt16, P9Message) -> Void)?
    /// Requests received, by message type: what each guest operation costs in round trips.
    private let counts = NIOLockedValueBox([Int](repeating: 0, count: 256))

    func count(_ type: UInt8) { counts.withLockedValue { $0[Int(type)] += 1 } }

    /// Requests received so far by every session, by name ("walk", "getattr", ...), nonzero only.
    public var requestCounts: [String: Int] {
        let c = counts.withLockedValue { $0 }
        var out: [String: Int] = [:]
        for (type, n) in c.enumerated() where n > 0 { out[P9.requestName(UInt8(type))] = n }
        return out
    }
    /// Zero copy (P9ZeroCopy.swift): every session of this server may name pages of this memory.
    let guestMemory: GuestMemory?
    /// Large writes' host write-out, started on the pool as they arrive (WriteBehind.swift).
    let writeBehind: WriteBehind

    /// - Parameters:
    ///   - threadPool: where blocking file system calls run; a started pool the caller owns, or nil
    ///     for one owned by the server (stopped by `shutdown()`).
    ///   - guestMemory: the guest's RAM when its transport sends zero-copy requests (Tzc).
    public convenience init(export: Plan9Export, threadPool: NIOThreadPool? = nil,
                            logger: Logger = Logger(label: "uvm.plan9"), guestMemory: GuestMemory? = nil) throws {
        try self.init(export: export, threadPool: threadPool, logger: logger, limits: SessionLimits(), beforeHandle: nil,
                      guestMemory: guestMemory)
    }

    init(export: Plan9Export, threadPool: NIOThreadPool?, logger: Logger, limits: SessionLimits,
         beforeHandle: (@Sendable (UInt16, P9Message) -> Void)?, guestMemory: GuestMemory? = nil) throws {
        self.export = export
        self.guestMemory = guestMemory
        do {
            core = try ExportCore(export: export)
        } catch {
            throw Plan9ServerError.cannotOpenRoot(export.root, error)
        }
        if let threadPool {
            self.threadPool = threadPool
            ownsPool = false
        } else {
            // Twice a session's share (SessionLimits.running): one busy session leaves half.
            let pool = NIOThreadPool(numberOfThreads: max(2 * limits.running, System.coreCount * 4))
            pool.start()
            self.threadPool = pool
            ownsPool = true
        }
        writeBehind = WriteBehind(pool: self.threadPool)
        var logger = logger
        logger[metadataKey: "export"] = "\(export.root)"
        self.logger = logger
        self.limits = limits
        self.beforeHandle = beforeHandle
    }

    deinit {
        if ownsPool { threadPool.shutdownGracefully(queue: .global()) { _ in } }
    }

    /// Stops the server's own thread pool (a pool passed in is left alone). Sessions still open
    /// answer EIO from then on.
    public func shutdown() async throws {
        if ownsPool { try await threadPool.shutdownGracefully() }
    }

    /// The handlers that make a channel carrying a 9P byte stream one session of this server, in
    /// order: framing, then the session. Add them on the channel's event loop.
    public func makeHandlers() -> [any ChannelHandler] {
        [ByteToMessageHandler(P9FrameDecoder(maxFrameSize: Int(guestMemory == nil ? P9.maxMsize : P9.zeroCopyMaxMsize))),
         Plan9SessionHandler(server: self)]
    }

    /// Adds the session handlers to `channel`'s pipeline (any byte-stream channel: uvmd uses this
    /// from a channel initializer for a unix-socket or virtio-serial stream).
    public func configure(channel: Channel) -> EventLoopFuture<Void> {
        if channel.eventLoop.inEventLoop {
            return channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandlers(self.makeHandlers())
            }
        }
        return channel.eventLoop.submit {
            try channel.pipeline.syncOperations.addHandlers(self.makeHandlers())
        }
    }

    /// Serves one session on an already active channel; returns when it closes.
    public func serve(channel: Channel) async throws {
        try await configure(channel: channel).get()
        try await channel.closeFuture.get()
    }

    /// Serves one session on a connected stream socket (e.g. one end of a socketpair); the server
    /// takes ownership of the descriptor. Returns when the session ends.
    public func serve(connectedSocket fd: CInt,
                      group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws {
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { self.configure(channel: $0) }
            .withConnectedSocket(fd).get()
        try await channel.closeFuture.get()
    }

    /// Serves one session over a pair of descriptors (pipes, a tty, stdin/stdout), taking ownership
    /// of them. Returns when the session ends.
    public func serve(input: CInt, output: CInt,
                      group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws {
        let bootstrap = NIOPipeBootstrap(group: group).channelInitializer { self.configure(channel: $0) }
        let channel = input == output
            ? try await bootstrap.takingOwnershipOfDescriptor(inputOutput: input).get()
            : try await bootstrap.takingOwnershipOfDescriptors(input: input, output: output).get()
        try await channel.closeFuture.get()
    }

    /// Listens on a unix socket; every connection is a session. Close the returned listener to
    /// stop listening (sessions already accepted go on).
    public func listen(unixSocketPath: String,
                       group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws -> Plan9Listener {
        try Plan9Listener(path: unixSocketPath, logger: logger) { fd in
            _ = ClientBootstrap(group: group)
                .channelInitializer { self.configure(channel: $0) }
                .withConnectedSocket(fd)
        }
    }
}

/// A listening unix socket whose connections are accepted on a thread of its own. NIO's accept
/// loop retries at once when accept fails for want of descriptors (EMFILE/ENFILE: the connection
/// stays queued, so the socket stays readable), spinning at 100% of a core; this one waits.
public final class Plan9Listener: Sendable {
    private let fd: CInt
    private let thread: NIOThreadPool
    private let stopped = NIOLockedValueBox(false)
    private let done: EventLoopPromise<Void>

    init(path: String, logger: Logger, accepted: @escaping @Sendable (CInt) -> Void) throws {
        let address = try SocketAddress(unixDomainSocketPath: path)
        // Only a stale socket is replaced, never another kind of file.
        var st = stat()
        if lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK { unlink(path) }
        let sock = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        let rc = address.withSockAddr { bind(sock, $0, socklen_t($1)) }
        guard rc == 0, Glibc.listen(sock, 16) == 0 else {
            let e = errno
            Glibc.close(sock)
            throw IOError(errnoCode: e, reason: "bind/listen \(path)")
        }
        fd = sock
        thread = NIOThreadPool(numberOfThreads: 1)
        thread.start()
        done = MultiThreadedEventLoopGroup.singleton.next().makePromise()
        let (fd, stopped, done) = (self.fd, self.stopped, self.done)
        thread.submit { _ in
            var failing = false
            while !stopped.withLockedValue({ $0 }) {
                let c = cp9_accept(fd)
                if c >= 0 {
                    failing = false
                    accepted(c)
                    continue
                }
                let e = errno
                switch e {
                case EINTR, ECONNABORTED, EAGAIN, EPROTO:
                    continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    // Until sessions end and give descriptors back; said once per episode.
                    if !failing { logger.error("cannot accept 9P sessions: \(P9Errno(e)); retrying") }
                    failing = true
                    usleep(100_000)
                default:
                    if !stopped.withLockedValue({ $0 }) { logger.error("9P listener stopped: \(P9Errno(e))") }
                    stopped.withLockedValue { $0 = true }
                }
            }
            Glibc.close(fd)
            done.succeed()
        }
    }

    /// Stops accepting; returns at once (see `closed`).
    public func close() {
        guard !stopped.withLockedValue({ old in defer { old = true }; return old }) else { return }
        shutdown(fd, CInt(SHUT_RDWR))  // wakes the accept
        thread.shutdownGracefully { _ in }
    }

    /// Waits until the listener has stopped (closed, or the socket failed).
    public func closed() async throws {
        try await done.futureResult.get()
    }
}

/// Whether a queued request may still be dropped by Tflush.
final class FlushTicket: @unchecked Sendable {
    private let lock = NIOLock()
    private var state = 0  // 0 queued, 1 started, 2 cancelled

    /// On the pool thread: false if the request was flushed before it started.
    func start() -> Bool {
        lock.withLock {
            guard state == 0 else { return false }
            state = 1
            return true
        }
    }

    /// On the event loop: true if the request had not started and now never will.
    func cancel() -> Bool {
        lock.withLock {
            guard state == 0 else { return false }
            state = 2
            return true
        }
    }
}

/// One 9P session on a channel. All state here is touched on the channel's event loop only; the
/// file system work runs on the server's pool and comes back to the loop to be answered. Nothing
/// here makes a file system call: a slow file system (NFS home) must not stall the loop, which
/// serves other sessions too.
final class Plan9SessionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Inflight {
        let ticket: FlushTicket
        /// Reply bytes held for it (a read's count) against SessionLimits.replyBytes.
        let replyBytes: Int
        /// Tflush tags waiting for this request's reply: Rflush goes out after it.
        var flushes: [UInt16] = []
    }

    private struct Waiting {
        let tag: UInt16
        let message: P9Message
        let ticket: FlushTicket
        let generation: Int
    }

    private let server: Plan9Server
    private let session: Plan9Session
    private var logger: Logger
    private var negotiated = false
    private var msize = Int(P9.minMsize)
    private var inflight: [UInt16: Inflight] = [:]
    /// Sum of the in-flight requests' replyBytes.
    private var replyBytes = 0
    /// Messages framed but not yet taken in: one socket read can hold thousands, and each is
    /// admitted only while the session is within its limits.
    private var backlog = CircularBuffer<ByteBuffer>()
    /// Requests taken in, waiting for one of the session's places on the pool.
    private var waiting = CircularBuffer<Waiting>()
    private var running = 0
    private var readHeld = false
    private var ended = false

    init(server: Plan9Server) {
        self.server = server
        session = Plan9Session(core: server.core, limits: server.limits, memory: server.guestMemory,
                               writeBehind: server.writeBehind)
        logger = server.logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        logger[metadataKey: "peer"] = "\(context.channel.remoteAddress.map { "\($0)" } ?? "fd")"
    }

    /// Whether another message may be taken in: checked per message, not per socket read.
    private func admits(_ context: ChannelHandlerContext) -> Bool {
        inflight.count < server.limits.inflight && replyBytes < server.limits.replyBytes
            && context.channel.isWritable
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !ended else { return }
        let bytes = unwrapInboundIn(data)
        if backlog.isEmpty && admits(context) {
            take(context, bytes)
        } else {
            backlog.append(bytes)
        }
    }

    private func take(_ context: ChannelHandlerContext, _ bytes: ByteBuffer) {
        if negotiated && bytes.readableBytes > msize {
            return fail(context, "message of \(bytes.readableBytes) bytes exceeds msize \(msize)")
        }
        let frame: P9Frame
        do {
            frame = try P9Frame.decode(bytes)
        } catch {
            return fail(context, "malformed message: \(error)")
        }
        server.count(frame.message.typeCode)
        let tag = frame.tag
        switch frame.message {
        case .tversion(let m, let version):
            dropAll()
            releaseFids()
            unsubscribeChanges()
            let reply = session.version(msize: m, version: version)
            if case .rversion(let agreed, let v) = reply, v.bytes == Array(P9.version.utf8) {
                negotiated = true
                msize = Int(agreed)
            } else {
                negotiated = false
            }
            send(context, tag, reply)
            context.flush()
        case .tflush(let oldtag):
            guard negotiated else { return fail(context, "Tflush before Tversion") }
            flush(context, tag: tag, oldtag: oldtag)
        case .tuvmnotify:
            guard negotiated else { return fail(context, "Tuvmnotify before Tversion") }
            guard inflight[tag] == nil else { return fail(context, "tag \(tag) reused while in flight") }
            send(context, tag, subscribeChanges(context))
            context.flush()
        case let message where message.typeCode & 1 == 1:
            fail(context, "client sent a reply message (type \(message.typeCode))")
        case let message:
            guard negotiated else { return fail(context, "message type \(message.typeCode) before Tversion") }
            guard inflight[tag] == nil else { return fail(context, "tag \(tag) reused while in flight") }
            dispatch(context, tag: tag, message: message)
        }
    }

    // MARK: change notes (cache=meta guests)

    /// Note bytes written and not yet sent: a guest that stops reading gets one "drop everything"
    /// note when it reads again instead of an unbounded queue.
    private var noteBytes = 0
    private var notesLost = false
    private var subscribed = false
    private static let noteBytesLimit = 1 << 20

    private func subscribeChanges(_ context: ChannelHandlerContext) -> P9Message {
        if subscribed { return .ruvmnotify(notes: []) }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        do throws(P9Errno) {
            let w = try server.core.subscribeChanges(ObjectIdentifier(self), logger: logger,
                                                     maxWatches: server.limits.watchedDirectories) { notes in
                loop.execute { handler.value.sendNotes(ctx.value, notes) }
            }
            session.changes.withLockedValue { $0 = w }
            subscribed = true
            return .ruvmnotify(notes: [])
        } catch {
            logger.warning("cannot watch \(server.export.root) for changes: \(error)")
            return .rlerror(ecode: UInt32(bitPattern: error.code))
        }
    }

    private func unsubscribeChanges() {
        guard subscribed else { return }
        subscribed = false
        session.changes.withLockedValue { $0 = nil }
        server.core.unsubscribeChanges(ObjectIdentifier(self))
    }

    private func sendNotes(_ context: ChannelHandlerContext, _ notes: [P9Note]) {
        guard subscribed, !ended, negotiated else { return }
        var notes = notes
        if noteBytes > Self.noteBytesLimit {
            notesLost = true
            return
        }
        if notesLost {
            notesLost = false
            notes = [P9Note(.all, path: 0)]
        }
        // Batches below msize (the client refuses a message of msize or more) and the guest's 64 KiB.
        let limit = min(msize - 1, 65535) - P9.headerSize - 2
        var batch: [P9Note] = []
        var size = 0
        func flushBatch() {
            guard !batch.isEmpty else { return }
            var buffer = context.channel.allocator.buffer(capacity: size + 16)
            P9Frame(tag: P9.noTag, message: .ruvmnotify(notes: batch)).encode(into: &buffer)
            let n = buffer.readableBytes
            noteBytes += n
            let promise = context.eventLoop.makePromise(of: Void.self)
            promise.futureResult.assumeIsolated().whenComplete { _ in self.noteBytes -= n }
            context.write(wrapOutboundOut(buffer), promise: promise)
            batch = []
            size = 0
        }
        for note in notes where note.wireSize <= limit {
            if size + note.wireSize > limit { flushBatch() }
            batch.append(note)
            size += note.wireSize
        }
        flushBatch()
        context.flush()
    }

    /// Requests in flight and waiting are dropped (Tversion, end of session).
    private func dropAll() {
        for (_, entry) in inflight { _ = entry.ticket.cancel() }
        inflight.removeAll()
        waiting.removeAll()
        replyBytes = 0
    }

    private func removeInflight(_ tag: UInt16) {
        if let entry = inflight.removeValue(forKey: tag) { replyBytes -= entry.replyBytes }
    }

    private func dispatch(_ context: ChannelHandlerContext, tag: UInt16, message: P9Message) {
        let ticket = FlushTicket()
        let reply: Int
        switch message {
        case .tread(_, _, let count), .treaddir(_, _, let count): reply = min(Int(count), msize)
        default: reply = 0
        }
        inflight[tag] = Inflight(ticket: ticket, replyBytes: reply)
        replyBytes += reply
        waiting.append(Waiting(tag: tag, message: message, ticket: ticket, generation: session.currentGeneration))
        startWaiting(context)
    }

    /// Hands waiting requests to the pool, up to the session's share of it.
    private func startWaiting(_ context: ChannelHandlerContext) {
        let session = self.session
        let hook = server.beforeHandle
        while running < server.limits.running, let next = waiting.popFirst() {
            running += 1
            let identity = server.export.identity
            server.threadPool.runIfActive(eventLoop: context.eventLoop) { () -> P9Message? in
                guard next.ticket.start() else { return nil }
                // Never as root by mistake: a thread that cannot take the identity does nothing.
                if let identity, !identity.adopt() { return .rlerror(ecode: UInt32(EPERM)) }
                hook?(next.tag, next.message)
                return session.handle(next.message, generation: next.generation)
            }.assumeIsolated().whenComplete { result in
                self.running -= 1
                self.complete(context, tag: next.tag, ticket: next.ticket, result: result)
                self.startWaiting(context)
            }
        }
    }

    private func complete(_ context: ChannelHandlerContext, tag: UInt16, ticket: FlushTicket,
                          result: Result<P9Message?, any Error>) {
        // Gone if the session was reset (Tversion) or closed meanwhile, or if Tflush dropped it.
        guard !ended, let entry = inflight[tag], entry.ticket === ticket else { return }
        removeInflight(tag)
        switch result {
        case .success(let reply?):
            send(context, tag, reply)
        case .success(nil):
            break
        case .failure:
            send(context, tag, .rlerror(ecode: UInt32(EIO)))  // the pool is shutting down
        }
        for f in entry.flushes { send(context, f, .rflush) }
        context.flush()
        resume(context)
    }

    /// Takes in what the limits now allow of the backlog, then reads again once it is empty.
    private func resume(_ context: ChannelHandlerContext) {
        while !ended, admits(context), let bytes = backlog.popFirst() {
            take(context, bytes)
        }
        if readHeld && !ended && backlog.isEmpty && admits(context) {
            readHeld = false
            context.read()
        }
    }

    /// Tflush: a request not yet started is dropped and answered by Rflush alone; one already
    /// running is answered first, then Rflush, as the protocol requires.
    private func flush(_ context: ChannelHandlerContext, tag: UInt16, oldtag: UInt16) {
        if var entry = inflight[oldtag], oldtag != tag {
            if entry.ticket.cancel() {
                removeInflight(oldtag)
                for f in entry.flushes { send(context, f, .rflush) }
                send(context, tag, .rflush)
            } else {
                entry.flushes.append(tag)
                inflight[oldtag] = entry
                return
            }
        } else {
            send(context, tag, .rflush)
        }
        context.flush()
    }
    private func send(_ context: ChannelHandlerContext, _ tag: UInt16, _ message: P9Message) {
        switch message {
        case .rread(let data), .rreaddir(let data):
            let size = P9.headerSize + 4 + data.readableBytes
            guard size < msize else { return oversized(context, tag, message.typeCode, size) }
            // Header and payload as two writes: the payload is not copied.
            var header = context.channel.allocator.buffer(capacity: 11)
            header.writeInteger(UInt32(size), endianness: .little)
            header.writeInteger(message.typeCode, endianness: .little)
            header.writeInteger(tag, endianness: .little)
            header.writeInteger(UInt32(data.readableBytes), endianness: .little)
            context.write(wrapOutboundOut(header), promise: nil)
            context.write(wrapOutboundOut(data), promise: nil)
        default:
            var buffer = context.channel.allocator.buffer(capacity: 64)
            P9Frame(tag: tag, message: message).encode(into: &buffer)
            // The Linux client rejects a reply of msize bytes or more: nothing that size leaves.
            if buffer.readableBytes >= msize, message.typeCode != 101 {
                return oversized(context, tag, message.typeCode, buffer.readableBytes)
            }
            context.write(wrapOutboundOut(buffer), promise: nil)
        }
    }

    private func oversized(_ context: ChannelHandlerContext, _ tag: UInt16, _ type: UInt8, _ size: Int) {
        logger.error("reply type \(type) of \(size) bytes would exceed msize \(msize); sent ERANGE instead")
        send(context, tag, .rlerror(ecode: UInt32(ERANGE)))
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        guard !ended else { return }
        logger.error("9P session ended: \(reason)")
        end()
        context.close(promise: nil)
    }

    private func end() {
        ended = true
        unsubscribeChanges()
        dropAll()
        backlog.removeAll()
        releaseFids()
    }

    /// Empties the session's fid table; the descriptors close on the pool (closing a file on NFS
    /// writes it back).
    private func releaseFids() {
        let fids = session.takeFids()
        if !fids.isEmpty { server.threadPool.submit { _ in _ = fids } }
    }

    // Back-pressure: a client that floods requests, or does not read its replies, stops being read
    // until some are answered and sent.
    func read(context: ChannelHandlerContext) {
        if !backlog.isEmpty || !admits(context) {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resume(context)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !ended {
            logger.debug("9P session closed by peer")
            end()
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(context, "\(error)")
    }
}
