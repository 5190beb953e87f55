import Foundation
import Logging
import NIOCore
import NIOPosix
import Plan9
import Wire

/// The host side of the shares of one running VM: each mounted share has a 9P port of its own
/// (a virtio-serial port whose host end QEMU offers as a unix socket), served by a Plan9Server
/// for that share's folder.
public actor ShareExporter {
    public struct Slot: Sendable {
        public var port: String        // the port's name in the guest
        public var socketPath: String  // QEMU's end on the host
        public init(port: String, socketPath: String) {
            self.port = port
            self.socketPath = socketPath
        }
    }

    private struct Active {
        var slot: Int
        var channel: Channel?
        var server: Plan9Server?
        /// A share served by an outside command (benchmarks).
        var process: Process?
    }

    public let slots: [Slot]
    private let pool: NIOThreadPool
    private let logger: Logger
    private var active: [String: Active] = [:]

    public init(slots: [Slot], logger: Logger) {
        self.slots = slots
        self.logger = logger
        // One pool for every share: blocking file system calls in flight at once, across shares.
        pool = NIOThreadPool(numberOfThreads: 16)
        pool.start()
    }

    deinit { pool.shutdownGracefully { _ in } }

    public var exported: [String] { active.keys.sorted() }

    /// Starts serving `share` on a free port; returns the port for the guest to mount.
    public func export(_ share: ShareSpec) async throws -> Slot {
        if active[share.name] != nil { await stop(share.name) }
        let used = Set(active.values.map(\.slot))
        guard let slot = slots.indices.first(where: { !used.contains($0) }) else {
            throw WireError(.badRequest, "no free 9P port for share \(share.name) (at most \(slots.count) shares)")
        }
        if let command = share.serverCommand {
            active[share.name] = Active(slot: slot, process: try Self.spawn(command, on: slots[slot].socketPath))
            return slots[slot]
        }
        var log = logger
        log[metadataKey: "share"] = "\(share.name)"
        let server = try Plan9Server(export: Plan9Export(root: share.path, readOnly: share.readOnly, metadata: share.metadata),
                                     threadPool: pool, logger: log)
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelOption(.socketOption(.so_sndbuf), value: 4 << 20)
            .channelInitializer { server.configure(channel: $0) }
            .connect(unixDomainSocketPath: slots[slot].socketPath).get()
        active[share.name] = Active(slot: slot, channel: channel, server: server)
        let name = share.name
        channel.closeFuture.whenComplete { _ in
            Task { await self.closed(name, channel: channel) }
        }
        return slots[slot]
    }

    private func closed(_ name: String, channel: Channel) {
        if let a = active[name], a.channel === channel { active[name] = nil }
    }

    /// Ends the 9P session of `name` (after the guest unmounted it) and frees its port.
    public func stop(_ name: String) async {
        guard let a = active.removeValue(forKey: name) else { return }
        try? await a.channel?.close()
        if let p = a.process, p.isRunning {
            p.terminate()
            p.waitUntilExit()
        }
    }

    /// `sh -c command` with stdin and stdout connected to QEMU's end of the port.
    private static func spawn(_ command: String, on socketPath: String) throws -> Process {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw WireError(.internalError, "socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in socketPath.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw WireError(.internalError, "cannot connect to \(socketPath): \(String(cString: strerror(errno)))")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        p.standardInput = handle
        p.standardOutput = handle
        try p.run()
        return p
    }

    /// The VM is gone: its ports went with it.
    public func stopAll() async {
        for name in exported { await stop(name) }
    }
}
