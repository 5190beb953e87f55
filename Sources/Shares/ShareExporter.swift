import CSyscalls
import Foundation
import Logging
import NIOCore
import NIOPosix
import Plan9
import Wire

/// The host side of the shares of one running VM: each mounted share has a slot of its own, served
/// by a Plan9Server for that share's folder. A slot is a channel of the shared-memory transport
/// when the VM has it (ShmTransport), else a virtio-serial port whose host end QEMU offers as a
/// unix socket (a VM adopted from an earlier uvmd: its shared memory went with that uvmd).
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
        var process: pid_t?
        /// The transport whose channel `slot` carries it, if not the virtio-serial port.
        var shm: ShmTransport?
    }

    /// Where a share was exported: the guest mounts shared-memory channel `channel` when there is
    /// one, else the slot's virtio-serial port.
    public struct Placement: Sendable {
        public var slot: Slot
        public var channel: Int?
        /// The server reads and writes the guest's pages (Tzc).
        public var zeroCopy = false
        /// The msize to mount with, if not the default: zero copy carries 1 MiB per message.
        public var msize: UInt32? { zeroCopy ? P9.zeroCopyMaxMsize : nil }
    }

    public let slots: [Slot]
    private var shm: ShmTransport?
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

    /// The running VM's shared-memory transport, or nil (no VM, or one without it).
    public func use(_ transport: ShmTransport?) {
        shm = transport
        warnedZeroCopy = false
    }
    private var warnedZeroCopy = false

    /// The requests `name`'s server has had since it was exported (nil: not served by ours).
    public func requestCounts(_ name: String) -> [String: Int]? {
        active[name]?.server?.requestCounts
    }

    /// Starts serving `share` in a free slot; returns where the guest mounts it.
    public func export(_ share: ShareSpec) async throws -> Placement {
        if active[share.name] != nil { await stop(share.name) }
        let used = Set(active.values.map(\.slot))
        guard let slot = slots.indices.first(where: { !used.contains($0) }) else {
            throw WireError(.badRequest, "no free 9P port for share \(share.name) (at most \(slots.count) shares)")
        }
        let shm = shm.flatMap { $0.connected && slot < $0.channels && share.viaPort != true ? $0 : nil }
        // Zero copy for our own server on a shared-memory channel, when guest RAM could be mapped.
        let memory = share.serverCommand == nil ? shm?.guestMemory() : nil
        if let shm, shm.guestRAMBytes != nil, memory == nil, share.serverCommand == nil, !warnedZeroCopy {
            warnedZeroCopy = true
            logger.warning("9P zero copy off: \(shm.zeroCopyProblem ?? "QEMU's pid is unknown")")
        }
        // The server's socket: our end of the shared-memory channel's pump, or QEMU's port.
        let fd = try shm?.attach(channel: slot, zeroCopy: memory != nil) ?? Self.connectPort(slots[slot].socketPath)
        let placement = Placement(slot: slots[slot], channel: shm == nil ? nil : slot, zeroCopy: memory != nil)
        if let command = share.serverCommand {
            do {
                active[share.name] = Active(slot: slot, process: try Self.spawn(command, fd: fd), shm: shm)
            } catch {
                shm?.detach(channel: slot)
                throw error
            }
            return placement
        }
        var log = logger
        log[metadataKey: "share"] = "\(share.name)"
        let channel: Channel
        do {
            let server = try Plan9Server(export: Plan9Export(root: share.path, readOnly: share.readOnly, metadata: share.metadata),
                                         threadPool: pool, logger: log, guestMemory: memory)
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
                .channelOption(.socketOption(.so_sndbuf), value: 4 << 20)
                .channelInitializer { server.configure(channel: $0) }
                .withConnectedSocket(fd).get()
            active[share.name] = Active(slot: slot, channel: channel, server: server, shm: shm)
        } catch {
            close(fd)
            shm?.detach(channel: slot)
            throw error
        }
        let name = share.name
        channel.closeFuture.whenComplete { _ in
            Task { await self.closed(name, channel: channel) }
        }
        return placement
    }

    private func closed(_ name: String, channel: Channel) {
        if let a = active[name], a.channel === channel {
            active[name] = nil
            a.shm?.detach(channel: a.slot)
        }
    }

    /// Ends the 9P session of `name` (after the guest unmounted it) and frees its port.
    public func stop(_ name: String) async {
        guard let a = active.removeValue(forKey: name) else { return }
        a.shm?.detach(channel: a.slot)
        try? await a.channel?.close()
        if let pid = a.process {
            kill(pid, SIGTERM)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
    }

    /// A socket connected to QEMU's end of a virtio-serial port.
    private static func connectPort(_ socketPath: String) throws -> Int32 {
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
            let why = String(cString: strerror(errno))
            close(fd)
            throw WireError(.internalError, "cannot connect to \(socketPath): \(why)")
        }
        return fd
    }

    /// `sh -c command` with stdin and stdout on `fd` (closed here: the child has its copy) and
    /// stderr on ours (uvmd's log).
    private static func spawn(_ command: String, fd: Int32) throws -> pid_t {
        defer { close(fd) }
        let args: [String] = ["sh", "-c", command]
        let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let pid = uvm_spawn_with_fds("/bin/sh", argv, fd, fd, 2)
        guard pid > 0 else { throw WireError(.internalError, "cannot start `\(command)`: \(String(cString: strerror(errno)))") }
        return pid
    }

    /// The VM is gone: its ports went with it.
    public func stopAll() async {
        for name in exported { await stop(name) }
    }
}
