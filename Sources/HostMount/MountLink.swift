import Dispatch
import Glibc
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Plan9
import Wire

/// A 9P error to hand to FUSE: a Linux errno.
struct MountError: Error {
    var errno: Int32
    /// For the user, when the mount cannot start.
    var message: String?
    init(_ errno: Int32, _ message: String? = nil) {
        self.errno = errno
        self.message = message
    }
}

/// One stream through uvmd to the guest agent's 9P server, attached as fid 0.
final class MountSession: Sendable {
    let client: Plan9Client
    let generation: Int
    let msize: Int
    let owner: ServeFilesReady
    private let fids = NIOLockedValueBox<UInt32>(1)

    init(client: Plan9Client, generation: Int, msize: Int, owner: ServeFilesReady) {
        self.client = client
        self.generation = generation
        self.msize = msize
        self.owner = owner
    }

    static let rootFid: UInt32 = 0

    /// A fid number not used on this stream before.
    func newFid() -> UInt32 {
        fids.withLockedValue { next in
            defer { next = next &+ 1 == P9.noFid ? 1 : next &+ 1 }
            return next
        }
    }

    var isOpen: Bool { client.channel.isActive }
}

/// The FUSE process's link to the guest: it holds a stream through uvmd only while something uses
/// it (operations running, files open) plus a short linger, so that an idle mount counts as no
/// client and the idle reaper may stop the instance and the VM. The next operation opens a new
/// stream, which starts them again.
final class MountLink: @unchecked Sendable {
    struct Timeouts {
        /// Opening a stream: uvmd may boot the VM and start the instance (systemd's boot is
        /// bounded at 90 s in the agent).
        var connect: TimeAmount = .seconds(180)
        /// One request on an open stream.
        var request: TimeAmount = .seconds(60)
        /// How long an unused stream is kept.
        var linger: TimeAmount = .seconds(2)
    }

    let request: FilesRequest
    let timeouts: Timeouts
    /// A connected socket to uvmd (started if needed); the caller's to close on failure.
    private let connectToDaemon: @Sendable () throws -> CInt

    private let lock = NIOLock()
    /// Serialises opening streams: one connect at a time, the others wait for it.
    private let opening = NIOLock()
    private var session: MountSession?
    private var generation = 0
    private var users = 0
    private var lingerToken = 0

    init(request: FilesRequest, timeouts: Timeouts = Timeouts(), connectToDaemon: @escaping @Sendable () throws -> CInt) {
        self.request = request
        self.timeouts = timeouts
        self.connectToDaemon = connectToDaemon
    }

    /// A live session, counted as used until `end()`.
    func begin() throws -> MountSession {
        lock.withLock { users += 1; lingerToken += 1 }
        do {
            return try current()
        } catch {
            end()
            throw error
        }
    }

    /// One use ended; when none is left the stream closes after the linger.
    func end() {
        let token: Int? = lock.withLock {
            users -= 1
            guard users == 0, session != nil else { return nil }
            lingerToken += 1
            return lingerToken
        }
        guard let token else { return }
        let linger = timeouts.linger
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(linger.nanoseconds))) { [self] in
            let idle: MountSession? = lock.withLock {
                guard users == 0, lingerToken == token, let s = session else { return nil }
                session = nil
                return s
            }
            if let idle { idle.client.channel.close(promise: nil) }
        }
    }

    /// Whether `s` is still the stream in use (a handle opened on an earlier one is stale: EIO).
    func isCurrent(_ s: MountSession) -> Bool {
        lock.withLock { session === s } && s.isOpen
    }

    private func current() throws -> MountSession {
        if let s = lock.withLock({ session }), s.isOpen { return s }
        return try opening.withLock {
            if let s = lock.withLock({ session }), s.isOpen { return s }
            let s = try connect()
            lock.withLock { session = s }
            return s
        }
    }

    /// Opens a stream: the `files` request, Tversion, Tattach, all within `timeouts.connect`.
    func connect() throws -> MountSession {
        let fd = try connectToDaemon()
        let notes = StreamNotes()
        let daemonRequest = DaemonRequest.files(request)
        let client: Plan9Client
        do {
            client = try Plan9Client.connect(socket: fd, transport: {
                [ByteToMessageHandler(FrameDecoder()), MessageToByteHandler(FrameEncoder()),
                 FrameBridge(request: daemonRequest, notes: notes)]
            }).wait()
        } catch {
            close(fd)
            throw MountError(EIO, "cannot talk to uvmd: \(error)")
        }
        func failure(_ error: Error) -> MountError {
            client.channel.close(promise: nil)
            // The channel's end is noted on its event loop: let that happen first.
            _ = try? client.channel.closeFuture.wait()
            return MountError(EIO, notes.failure ?? "the guest's file server did not answer: \(error)")
        }
        let msize: UInt32
        do {
            let reply = try client.call(.tversion(msize: P9.maxMsize, version: P9String(P9.version)), timeout: timeouts.connect)
            guard case .rversion(let m, let v) = reply, v.bytes == Array(P9.version.utf8), m >= P9.minMsize, m <= P9.maxMsize else {
                throw Plan9ClientError.malformedReply("Tversion answered with \(reply)")
            }
            msize = m
            let attach = try client.call(.tattach(fid: MountSession.rootFid, afid: P9.noFid, uname: "", aname: "", nUname: P9.noUname),
                                         timeout: timeouts.request)
            if case .rlerror(let e) = attach { throw P9Errno(Int32(truncatingIfNeeded: e)) }
            guard case .rattach = attach else { throw Plan9ClientError.malformedReply("Tattach answered with \(attach)") }
        } catch {
            throw failure(error)
        }
        // The agent says whom it serves as before its first 9P byte.
        guard let owner = notes.ready else { throw failure(Plan9ClientError.malformedReply("no owner announced")) }
        let g = lock.withLock { generation += 1; lastOwner = owner; return generation }
        return MountSession(client: client, generation: g, msize: Int(msize), owner: owner)
    }

    /// The reply to `message` on `s`: Rlerror as its errno, anything going wrong with the stream
    /// (the VM stopped, a timeout, a malformed reply) as EIO.
    func call(_ s: MountSession, _ message: P9Message) throws -> P9Message {
        let reply: P9Message
        do {
            reply = try s.client.call(message, timeout: timeouts.request)
        } catch {
            throw MountError(EIO)
        }
        if case .rlerror(let e) = reply {
            // An errno from the guest, untrusted: within Linux's range or EIO.
            throw MountError(e > 0 && e < 4096 ? Int32(e) : EIO)
        }
        return reply
    }

    /// Whom the guest serves as (from the last stream opened).
    var owner: ServeFilesReady? { lock.withLock { lastOwner } }
    private var lastOwner: ServeFilesReady?

    /// Closes the stream now (unmount).
    func shutdown() {
        let s: MountSession? = lock.withLock {
            defer { session = nil }
            return session
        }
        if let s { try? s.client.channel.close().wait() }
    }
}
