import NIOCore
import Wire

/// The calls uvmd makes into the guest agent (uvm-init), typed: one HTTP/2 stream per call over
/// the VM's control link. VMController, ShareService and PortForwarder all go through it, and
/// tests put a fake agent at the other end of the link (DaemonTests).
struct GuestAgentClient: Sendable {
    let link: HTTP2Sessions.ClientMultiplexer
    /// What the agent said its protocol was (`GuestInfo.protocolVersion`); nil until asked.
    /// An agent from another uvm build only gets the calls every version understands.
    var agentVersion: Int?

    init(link: HTTP2Sessions.ClientMultiplexer, agentVersion: Int? = nil) {
        self.link = link
        self.agentVersion = agentVersion
    }

    /// The same link, for an agent that said who it is (`info`).
    func knowing(_ info: GuestInfo) -> GuestAgentClient {
        GuestAgentClient(link: link, agentVersion: info.protocolVersion ?? WireVersion.unversioned)
    }

    /// Why calls other than `info` and `shutdown` are refused.
    var incompatibility: WireError? {
        guard let v = agentVersion, v != WireVersion.current else { return nil }
        return WireError(.versionMismatch, "the running VM's guest agent speaks uvm protocol \(v) and this uvmd \(WireVersion.current): "
            + "the VM was started by another uvm version. `uvm stop` (then any command) restarts it with this one")
    }

    /// A request/response call.
    func call<C: GuestCall>(_ call: C) async throws -> C.Response {
        try await session(call.request) { inbound, _ in
            var answer: Frame? = nil
            // Until the guest closes the stream (closing it first would reset it).
            for try await frame in inbound where answer == nil && frame.kind.isFinal { answer = frame }
            guard let answer else { throw WireError(.vmStopped, "the guest closed the session") }
            if answer.kind == .error { throw try answer.decode(WireError.self) }
            return try answer.decode(C.Response.self)
        }
    }

    func info() async throws -> GuestInfo { try await call(InfoRequest()) }
    func shutdown() async throws { _ = try await call(ShutdownRequest()) }
    func mount(_ request: MountRequest) async throws { _ = try await call(request) }
    func unmount(share name: String) async throws { _ = try await call(UnmountRequest(name: name)) }
    func stopInstance(_ name: String) async throws { _ = try await call(StopInstanceRequest(name: name)) }
    func startInstance(_ name: String) async throws { _ = try await call(StartInstanceRequest(name: name, diskSerial: diskSerial(name))) }

    /// One TCP connection to `port` on the guest's loopback, relayed by `body`.
    func connect<T: Sendable>(port: UInt16, _ body: Body<T>) async throws -> T {
        try await session(.connect(ConnectRequest(port: port)), body)
    }

    /// Hands every snapshot of the guest's listening ports to `onSnapshot` until the stream ends.
    func watchPorts(_ onSnapshot: @Sendable ([ListeningPort]) async -> Void) async throws {
        try await session(.watchPorts(WatchPortsRequest())) { inbound, _ in
            for try await frame in inbound {
                switch frame.kind {
                case .event: await onSnapshot(try frame.decode([ListeningPort].self))
                case .error: throw try frame.decode(WireError.self)
                default: break
                }
            }
        }
    }

    typealias Body<T> = (NIOAsyncChannelInboundStream<Frame>, NIOAsyncChannelOutboundWriter<Frame>) async throws -> T

    /// Opens a stream, sends `request`, runs `body`, closes the stream.
    func session<T: Sendable>(_ request: GuestRequest, _ body: Body<T>) async throws -> T {
        switch request {
        case .info, .shutdown: break
        default: if let incompatibility { throw incompatibility }
        }
        let session = try await HTTP2Sessions.openSession(link)
        return try await session.executeThenClose { inbound, outbound in
            try await outbound.write(request.frame)
            return try await body(inbound, outbound)
        }
    }
}
