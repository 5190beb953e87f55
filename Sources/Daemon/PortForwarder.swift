import Logging
import Reaper
import NIOCore
import NIOPosix
import Settings
import Wire

/// Localhost forwarding (WSL's localhost relay): the guest agent reports the TCP ports listening
/// on its loopback or wildcard addresses (`watchPorts`), and for each one we listen on the same
/// port on the host's 127.0.0.1 and ::1 (loopback only, never other interfaces) and relay every
/// accepted connection to the guest over its own HTTP/2 stream (`connect`). A host port that is
/// already taken is reported (log and `uvm ports`), not fatal.
actor PortForwarder {
    static let hostAddresses = ["127.0.0.1", "::1"]
    typealias Connection = NIOAsyncChannel<ByteBuffer, ByteBuffer>

    private struct Forward {
        var guest: ListeningPort
        var listeners: [Channel] = []
        var hostAddresses: [String] = []
        var error: String?
        /// Beyond `maxPorts`: listed, not listened on, not retried.
        var overLimit = false
    }

    let enabled: Bool
    let logger: Logger
    /// Forwarded connections are clients of the distro whose process listens.
    let reaper: Reaper
    let defaultDistro: String
    private var forwards: [UInt16: Forward] = [:]
    private var watcher: Task<Void, Never>?
    private var generation = 0
    private var retry: Task<Void, Never>?
    /// How often a port that was taken on the host is tried again.
    static let retryInterval: Duration = .seconds(2)

    /// A guest listening on thousands of ports must not make uvmd open thousands of descriptors
    /// (two listeners each): the lowest `maxPorts` ports are forwarded, the rest only listed.
    let maxPorts: Int

    init(enabled: Bool, logger: Logger, reaper: Reaper, defaultDistro: String, maxPorts: Int = 512) {
        self.maxPorts = maxPorts
        self.enabled = enabled
        self.logger = logger
        self.reaper = reaper
        self.defaultDistro = defaultDistro
    }

    /// Follows the guest behind `agent` until its link ends; then every host port is released.
    func start(agent: GuestAgentClient) {
        guard enabled else { return }
        watcher?.cancel()
        releaseAll()
        generation += 1
        let gen = generation
        watcher = Task { await self.watch(agent: agent, generation: gen) }
    }

    /// What `uvm ports` shows.
    func list() -> [ForwardedPort] {
        forwards.keys.sorted().map { p in
            let f = forwards[p]!
            return ForwardedPort(guest: f.guest, hostAddresses: f.hostAddresses, error: f.error)
        }
    }

    private func watch(agent: GuestAgentClient, generation gen: Int) async {
        do {
            try await agent.watchPorts { ports in await self.apply(ports, agent: agent, generation: gen) }
        } catch let e as WireError {
            logger.warning("port tracker failed", metadata: ["error": "\(e.message)"])
        } catch {
            logger.debug("port watch ended", metadata: ["error": "\(error)"])
        }
        if gen == generation { releaseAll() }
    }

    private func apply(_ ports: [ListeningPort], agent: GuestAgentClient, generation gen: Int) async {
        guard gen == generation else { return }
        defer { scheduleRetry(ports, agent: agent, generation: gen) }
        let wanted = Dictionary(ports.map { ($0.port, $0) }, uniquingKeysWith: { a, _ in a })
        for (port, f) in forwards where wanted[port] == nil {
            f.listeners.forEach { $0.close(promise: nil) }
            forwards[port] = nil
            logger.info("stopped forwarding", metadata: ["port": "\(port)"])
        }
        let sorted = wanted.sorted(by: { $0.key < $1.key })
        for (port, guest) in sorted.dropFirst(maxPorts) {
            var f = forwards[port] ?? Forward(guest: guest)
            if !f.overLimit {
                if forwards[port] == nil { logger.warning("not forwarding guest port: over the limit", metadata: ["port": "\(port)", "limit": "\(maxPorts)"]) }
                f.listeners.forEach { $0.close(promise: nil) }
                f = Forward(guest: guest, error: "not forwarded: the guest listens on more than \(maxPorts) ports (uvm forwards the lowest \(maxPorts))", overLimit: true)
            }
            f.guest = guest
            forwards[port] = f
        }
        for (port, guest) in sorted.prefix(maxPorts) {
            if forwards[port]?.overLimit == true { forwards[port] = nil }
            if var f = forwards[port], f.error == nil {
                f.guest = guest
                forwards[port] = f
                continue
            }
            // New, or taken on the host last time: (try to) listen now.
            var f = forwards[port] ?? Forward(guest: guest)
            f.guest = guest
            forwards[port] = f
            let (listeners, addresses, error) = await listen(port: port, skipping: f.hostAddresses, distro: guest.distro ?? defaultDistro, agent: agent)
            guard gen == generation, forwards[port] != nil else {
                listeners.forEach { $0.close(promise: nil) }
                continue
            }
            let previous = f.error
            f.listeners += listeners
            f.hostAddresses += addresses
            f.error = error
            forwards[port] = f
            if error != nil && error == previous { continue }  // still taken: said so already
            if let error {
                logger.warning("cannot forward guest port", metadata: ["port": "\(port)", "why": "\(error)"])
            } else {
                logger.info("forwarding", metadata: ["port": "\(port)", "distro": "\(guest.distro ?? "-")", "process": "\(guest.process ?? "-")"])
            }
        }
    }

    /// A host port taken by another program may be freed later: try again while any is failing.
    private func scheduleRetry(_ ports: [ListeningPort], agent: GuestAgentClient, generation gen: Int) {
        retry?.cancel()
        retry = nil
        guard forwards.values.contains(where: { $0.error != nil && !$0.overLimit }) else { return }
        retry = Task {
            try? await Task.sleep(for: Self.retryInterval)
            if !Task.isCancelled { await self.apply(ports, agent: agent, generation: gen) }
        }
    }

    private func releaseAll() {
        retry?.cancel()
        retry = nil
        for f in forwards.values { f.listeners.forEach { $0.close(promise: nil) } }
        forwards = [:]
    }

    /// Binds 127.0.0.1:port and [::1]:port. A host without IPv6 on its loopback gets the IPv4 one only.
    private func listen(port: UInt16, skipping bound: [String], distro: String, agent: GuestAgentClient) async
        -> (listeners: [Channel], addresses: [String], error: String?) {
        var listeners: [Channel] = [], addresses: [String] = [], errors: [String] = []
        for host in Self.hostAddresses where !bound.contains(host) {
            do {
                let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                    .childChannelOption(.allowRemoteHalfClosure, value: true)
                    // Big reads make big frames: each frame costs the same in the guest, whatever its size.
                    .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
                    .bind(host: host, port: Int(port)) { child in
                        child.eventLoop.makeCompletedFuture { try acceptedConnection(child) }
                    }
                listeners.append(server.channel)
                addresses.append(host)
                let logger = logger
                Task {
                    do {
                        try await server.executeThenClose { accepted in
                            try await withThrowingDiscardingTaskGroup { group in
                                for try await connection in accepted {
                                    group.addTask { await self.relay(connection, port: port, distro: distro, agent: agent) }
                                }
                            }
                        }
                    } catch {
                        logger.warning("stopped listening on a forwarded port", metadata: ["host": "\(host)", "port": "\(port)", "error": "\(error)"])
                    }
                }
            } catch let e as IOError where e.errnoCode == EADDRNOTAVAIL || e.errnoCode == EAFNOSUPPORT {
                continue  // no such loopback address on this host
            } catch let e as IOError where e.errnoCode == EADDRINUSE {
                errors.append("\(host == "::1" ? "[::1]" : host):\(port) is already in use on the host")
            } catch {
                errors.append("\(host):\(port): \(error)")
            }
        }
        return (listeners, addresses, errors.isEmpty ? nil : errors.joined(separator: "; "))
    }

    /// Every forwarded connection is a client session while it is open (the idle reaper must not
    /// stop a VM that is serving one). The one place that counts them.
    private nonisolated func counted(distro: String, _ body: () async -> Void) async {
        let token = await reaper.begin(distro: distro)
        await body()
        await reaper.end(token)
    }

    /// Host connection <-> one guest stream: `stdin`/`stdinEOF` towards the guest, `stdout`/
    /// `stdoutEOF` back; the guest ends with `exit` when both directions are done, or `error`.
    /// The host connection is the outer scope: whatever happens to the guest stream (the link
    /// is gone, the agent refuses), it is closed, never dropped unfinished.
    private nonisolated func relay(_ connection: Connection, port: UInt16, distro: String, agent: GuestAgentClient) async {
        await counted(distro: distro) {
            do {
                try await connection.executeThenClose { fromHost, toHost in
                    try await agent.connect(port: port) { fromGuest, toGuest in
                        try await withThrowingTaskGroup(of: Bool.self) { group in
                            group.addTask {
                                for try await chunk in fromHost { try await toGuest.write(Frame(.stdin, chunk)) }
                                if !Task.isCancelled { try await toGuest.write(Frame(.stdinEOF)) }
                                return false
                            }
                            group.addTask {
                                for try await frame in fromGuest {
                                    switch frame.kind {
                                    case .stdout: try await toHost.write(frame.payload)
                                    case .stdoutEOF: await toHost.finish(after: connection.channel)
                                    case .error:
                                        // The guest's connect() failed, or its server reset the
                                        // connection: the host client sees a reset too, not an
                                        // empty reply it could take for an answer.
                                        try? await (connection.channel as? SocketOptionProvider)?
                                            .setSoLinger(linger(l_onoff: 1, l_linger: 0)).get()
                                        throw try frame.decode(WireError.self)
                                    default: break
                                    }
                                }
                                return true
                            }
                            // The guest's end settles it; the host's EOF alone does not.
                            for try await guestDone in group where guestDone {
                                group.cancelAll()
                                break
                            }
                        }
                    }
                }
            } catch {
                logger.debug("forwarded connection ended", metadata: ["port": "\(port)", "error": "\(error)"])
            }
        }
    }
}

/// A server's accepted connection, with NIO's deinit-based teardown on purpose (the deprecated
/// initializer): one accepted while the server shuts down is dropped by the server's stream before
/// anyone runs executeThenClose on it, and with `wrappingChannelSynchronously` its writer then traps
/// in deinit, taking uvmd down (swift-nio#2637; it crashed a test run through the port forwarder).
/// This one is closed instead. Used by uvmd's own socket too.
func acceptedConnection<Inbound: Sendable, Outbound: Sendable>(
    _ child: Channel, configuration: NIOAsyncChannel<Inbound, Outbound>.Configuration = .init()
) throws -> NIOAsyncChannel<Inbound, Outbound> {
    try NIOAsyncChannel(synchronouslyWrapping: child, configuration: configuration)
}

private func acceptedConnection(_ child: Channel) throws -> PortForwarder.Connection {
    try acceptedConnection(child, configuration: .init(isOutboundHalfClosureEnabled: true))
}
