@testable import Daemon
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Testing
import Wire

/// A guest agent inside the test process. uvmd's real `GuestAgentClient` talks HTTP/2 to it over
/// a socketpair, as it talks to uvm-init over the VM's virtio-serial control port: the daemon's
/// logic runs unchanged, and no VM is needed.
final class FakeAgent: Sendable {
    typealias Handler = @Sendable (GuestRequest, AsyncStream<Frame>, NIOAsyncChannelOutboundWriter<Frame>) async throws -> Void

    /// The client as uvmd holds it after its first `info` (so it knows the agent's version).
    let client: GuestAgentClient
    private let received: Recorder
    private let channels: [Channel]
    private let server: Task<Void, Never>

    /// Every request the agent got, in order of arrival.
    var requests: [GuestRequest] { received.list.withLock { $0 } }

    final class Recorder: Sendable {
        let list = Mutex<[GuestRequest]>([])
    }

    /// `version`: what the agent says in `info` (nil: an agent from before versioning).
    /// `handler` answers everything but `info`.
    static func start(version: Int? = WireVersion.current, handler: @escaping Handler) async throws -> FakeAgent {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw WireError(.internalError, "socketpair: \(errno)")
        }
        let group = MultiThreadedEventLoopGroup.singleton
        let (sc, inbound) = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(inputOutput: fds[0]) { ch in
            HTTP2Sessions.configureServer(ch).map { (ch, $0) }
        }
        let (cc, link) = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(inputOutput: fds[1]) { ch in
            HTTP2Sessions.configureClient(ch).map { (ch, $0) }
        }
        let received = Recorder()
        let server = Task {
            await withDiscardingTaskGroup { group in
                do {
                    for try await session in inbound.inbound {
                        group.addTask {
                            try? await FrameSession.serve(session) { first, rest, outbound in
                                do {
                                    // A real agent's rules: the version is checked before anything else.
                                    let request = try first.decodeGuestRequest(who: "the fake agent")
                                    received.list.withLock { $0.append(request) }
                                    if case .info = request {
                                        try await outbound.write(.json(.response, GuestInfo(
                                            kernelRelease: "6.1-fake", uptimeSeconds: 1, memTotalKiB: 1024, memAvailableKiB: 512,
                                            instances: [], protocolVersion: version)))
                                        return
                                    }
                                    try await handler(request, rest, outbound)
                                } catch let e as WireError {
                                    try await outbound.write(.error(e))
                                }
                            }
                        }
                    }
                } catch {}
            }
        }
        let info = try await GuestAgentClient(link: link).info()
        return FakeAgent(client: GuestAgentClient(link: link).knowing(info), received: received, channels: [sc, cc], server: server)
    }

    private init(client: GuestAgentClient, received: Recorder, channels: [Channel], server: Task<Void, Never>) {
        self.client = client
        self.received = received
        self.channels = channels
        self.server = server
    }

    /// The link goes down, as when the VM dies.
    func close() {
        channels.forEach { $0.close(promise: nil) }
        server.cancel()
    }
}

/// Waits (bounded) until `condition` holds; false if it never did within `seconds`. The bound is
/// generous because it is wall time: the unit tests run in parallel on a 2-core machine, and a CI
/// run saw every test stall for ~19 s at its start, which made a 10 s bound fail a port report
/// that normally arrives in milliseconds. Only a failing condition waits that long.
func eventually(seconds: Double = 60, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}
