import CSyscalls
import Glibc
import NIOCore
import NIOPosix
import Wire

/// The guest end of one forwarded connection: connects to the port on the guest's loopback and
/// relays bytes both ways. `stdin` frames carry host->guest bytes and `stdinEOF` the host's
/// half-close; `stdout` frames carry guest->host bytes and `stdoutEOF` the guest's half-close.
/// When both directions are done the session ends with `exit`.
enum PortRelay {
    typealias Connection = NIOAsyncChannel<ByteBuffer, ByteBuffer>

    static func connect(port: UInt16, rest: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        let connection = try await open(port: port)
        try await connection.executeThenClose { fromGuest, toGuest in
            try await withThrowingTaskGroup(of: Bool.self) { group in
                group.addTask {
                    for await frame in rest {
                        switch frame.kind {
                        case .stdin: try await toGuest.write(frame.payload)
                        case .stdinEOF:
                            await toGuest.finish(after: connection.channel)
                            return true
                        default: break
                        }
                    }
                    return false  // uvmd dropped the connection: abort ours
                }
                group.addTask {
                    for try await chunk in fromGuest {
                        try await outbound.write(Frame(.stdout, chunk))
                    }
                    try await outbound.write(Frame(.stdoutEOF))
                    return true
                }
                for try await finished in group where !finished {
                    group.cancelAll()
                    return
                }
            }
        }
        try await outbound.write(.json(.exit, ExitStatus(code: 0)))
    }

    /// 127.0.0.1 first, then ::1: the tracker reports the port when either (or a wildcard) listens.
    static func open(port: UInt16) async throws -> Connection {
        // A loopback handshake takes microseconds, so a short synchronous wait for it is far
        // cheaper under TCG than an event-loop connect (milliseconds per connection). Only when
        // the server's backlog is full does it take longer; then NIO waits for it.
        let fd = uvm_connect_loopback(port, 5)
        if fd >= 0 {
            return try await bootstrap().withConnectedSocket(fd) { wrap($0) }
        }
        var lastError: Error = IOError(errnoCode: errno, reason: "connect")
        if errno == ETIMEDOUT {
            for host in ["127.0.0.1", "::1"] {
                do {
                    return try await bootstrap()
                        .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                        .connect(to: try SocketAddress(ipAddress: host, port: Int(port))) { wrap($0) }
                } catch {
                    lastError = error
                }
            }
        }
        throw WireError(.notFound, "nothing accepts connections on port \(port) in the guest: \(lastError)")
    }

    static func bootstrap() -> ClientBootstrap {
        ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: true)
            // Big reads make big frames: under TCG each frame has a fixed cost, whatever its size.
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
    }

    @Sendable
    static func wrap(_ channel: Channel) -> EventLoopFuture<Connection> {
        channel.eventLoop.makeCompletedFuture {
            try Connection(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
        }
    }
}

