import CSyscalls
import Glibc
import Logging
import NIOCore
import NIOPosix
import Plan9
import Wire

/// `uvm mount`: serves a distro instance's root over 9P2000.L, the bytes travelling as `stdin`
/// (host -> guest) and `stdout` (guest -> host) frames of one session. The server is uvm's own
/// (Plan9Server, as uvmd runs for shares), fed through a socketpair, and acts as the distro's
/// default user: what the host creates is theirs, and the host reaches only what they may.
enum FileServer {
    /// File system threads per session: enough for a FUSE client's parallel requests.
    static let threads = 4

    static func serve(_ r: ServeFilesRequest, instances: Instances, rest: AsyncStream<Frame>,
                      outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        let instance = try await instances.instance(r.distro, diskSerial: r.distroDisk)
        let account = try instance.account(r.user)
        let identity = Plan9Identity(uid: account.uid, gid: account.gid, groups: account.groups)
        // The instance's root as its own processes see it, its mounts (/proc, /run, ...) included.
        let export = Plan9Export(root: instance.rootPath, identity: identity)
        let pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
        defer { pool.shutdownGracefully { _ in } }
        var logger = Logger(label: "uvm-init.files")
        logger.logLevel = .warning
        let server: Plan9Server
        do {
            server = try Plan9Server(export: export, threadPool: pool, logger: logger)
        } catch {
            throw WireError(.internalError, "cannot serve distro \(r.distro)'s files: \(error)")
        }
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw WireError(.internalError, "socketpair: \(String(cString: strerror(errno)))")
        }
        let (serverFD, relayFD) = (fds[0], fds[1])
        let serving = Task { try? await server.serve(connectedSocket: serverFD) }
        let link: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        do {
            link = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
                .withConnectedSocket(relayFD) { ch in
                    ch.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch) }
                }
        } catch {
            close(relayFD)
            serving.cancel()
            throw WireError(.internalError, "cannot relay 9P: \(error)")
        }
        try await outbound.write(.json(.event, ServeFilesReady(user: account.name, uid: account.uid, gid: account.gid)))
        log("files of \(r.distro) served to the host as \(account.name)")
        try await link.executeThenClose { fromServer, toServer in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    // The host's 9P bytes; the session ends when uvmd ends it (the mount idle,
                    // unmounted, or gone).
                    for await frame in rest {
                        switch frame.kind {
                        case .stdin: try await toServer.write(frame.payload)
                        case .stdinEOF: return
                        default: break
                        }
                    }
                }
                group.addTask {
                    for try await chunk in fromServer { try await outbound.write(Frame(.stdout, chunk)) }
                }
                // Either way ends the session: the other side's bytes have nowhere to go.
                _ = try await group.next()
                group.cancelAll()
            }
        }
        // The server's end sees EOF and releases the session's fids.
        await serving.value
        try await outbound.write(.json(.exit, ExitStatus(code: 0)))
    }
}
