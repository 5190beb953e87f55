import Foundation
import Logging
import NIOCore
import NIOPosix
import Reaper
import Settings
import Wire

/// uvmd: serves the `uvm` command on a unix socket that only its user can reach.
public struct UVMDaemon: Sendable {
    let paths: Paths
    let settings: Settings
    let logger: Logger
    let controller: VMController
    /// Counts clients per distro instance and stops what is idle.
    let reaper: Reaper
    let forwarder: PortForwarder

    public init(paths: Paths = .current(), settings: Settings = .current(), logger: Logger) {
        self.paths = paths
        self.settings = settings
        self.logger = logger
        let reaper = Reaper(instanceIdle: settings.instanceIdleTimeout, vmIdle: settings.vmIdleTimeout)
        self.reaper = reaper
        self.forwarder = PortForwarder(enabled: settings.localhostForwarding, logger: logger, reaper: reaper, defaultDistro: settings.defaultDistro,
                                       maxPorts: settings.maxForwardedPorts)
        self.controller = VMController(paths: paths, settings: settings, logger: logger, forwarder: forwarder)
    }

    public enum StartError: Error, CustomStringConvertible {
        case alreadyRunning(String)
        case cannotListen(String)
        public var description: String {
            switch self {
            case .alreadyRunning(let lock): return "uvmd is already running (lock \(lock) is held)"
            case .cannotListen(let why): return why
            }
        }
    }

    /// Import and export tars left by a `uvm import` or a uvmd that was killed: each import and
    /// export deletes its own. One written in the last 10 minutes may be a `uvm` that launched us.
    static func clearStaleSpool(_ paths: Paths) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: paths.spoolDir) else { return }
        let now = time(nil)
        for n in names {
            let path = "\(paths.spoolDir)/\(n)"
            var st = stat()
            guard Paths.SpoolKind.allCases.contains(where: { paths.isSpoolFile(path, $0) }), lstat(path, &st) == 0,
                  now - st.st_mtim.tv_sec > 600 else { continue }
            unlink(path)
        }
    }

    /// Listens (or takes the systemd-activated socket) and serves until SIGTERM/SIGINT.
    public func run() async throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: paths.stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        chmod(paths.stateDir, 0o700)
        // One uvmd per state directory: the lock lives as long as this process.
        let lockFD = open(paths.daemonLock, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lockFD >= 0, flock(lockFD, LOCK_EX | LOCK_NB) == 0 else { throw StartError.alreadyRunning(paths.daemonLock) }
        // The lock file names its holder, for scripts that need to stop this uvmd.
        ftruncate(lockFD, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(lockFD, $0, strlen($0)) }

        Self.clearStaleSpool(paths)
        let server = try await listen()
        logger.info("uvmd listening", metadata: ["socket": "\(paths.socket)", "pid": "\(getpid())"])

        let signals = SignalWatcher([SIGTERM, SIGINT])
        let controller = self.controller, reaper = self.reaper, logger = self.logger
        await reaper.setActions(Reaper.Actions(
            stopInstance: { await controller.stopInstance($0) },
            stopVM: { reason in
                logger.info("idle reaper: stopping the VM", metadata: ["reason": "\(reason)"])
                await controller.stop(reason: reason)
            },
            keptBy: { await controller.keptBy($0) }))
        // Before serving: a VM an earlier uvmd left running is taken over (or destroyed).
        await controller.adoptLeftover()
        let (exited, exitedSink) = AsyncStream.makeStream(of: Void.self)
        let socketPath = paths.socket
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                for await event in controller.lifecycle {
                    switch event {
                    case .started(let instances): await reaper.vmStarted(instances: instances)
                    case .stopped: await reaper.vmStopped()
                    }
                }
            }
            group.addTask {
                await signals.wait()
                // Stop accepting at once (a restart's next uvmd serves new commands: the CLI
                // launches it and waits until this one is gone), then take the VM down.
                logger.info("signal received: no new commands; stopping the VM and exiting")
                try? await server.channel.close()
                try? FileManager.default.removeItem(atPath: socketPath)
                await controller.stop(reason: "uvmd exiting")
                controller.finishLifecycle()
                exitedSink.finish()
            }
            try await server.executeThenClose { clients in
                for try await client in clients {
                    group.addTask { await ClientSession(daemon: self, channel: client).run() }
                }
            }
            // The listener closed on a signal: what is left ends with the VM's stop.
            for await _ in exited {}
            group.cancelAll()
        }
        try? fm.removeItem(atPath: paths.socket)
        // Free the lock before the process ends: the next uvmd may start now.
        close(lockFD)
    }

    private func listen() async throws -> NIOAsyncChannel<NIOAsyncChannel<Frame, Frame>, Never> {
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 256)
        let initializer: @Sendable (Channel) -> EventLoopFuture<NIOAsyncChannel<Frame, Frame>> = { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addFrameCodec()
                return try acceptedConnection(channel)  // see there: a client accepted at shutdown must not trap
            }
        }
        // systemd socket activation (uvmd.socket): the listening socket is fd 3.
        let env = ProcessInfo.processInfo.environment
        if env["LISTEN_PID"] == String(getpid()), env["LISTEN_FDS"] == "1" {
            return try await bootstrap.bind(3, childChannelInitializer: initializer)
        }
        try FileManager.default.createDirectory(atPath: (paths.socket as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        // The lock says no other uvmd runs here, so a socket file left over is stale.
        try? FileManager.default.removeItem(atPath: paths.socket)
        // Created 0600 from the start (umask), not chmod'ed afterwards: no window where others could connect.
        let old = umask(0o177)
        defer { umask(old) }
        do {
            return try await bootstrap.bind(unixDomainSocketPath: paths.socket, cleanupExistingSocketFile: true, serverBackPressureStrategy: nil, childChannelInitializer: initializer)
        } catch {
            throw StartError.cannotListen("cannot listen on \(paths.socket): \(error)")
        }
    }
}

/// Waits for one of a set of signals (ignored as signals, taken by dispatch sources instead).
final class SignalWatcher: @unchecked Sendable {
    private let stream: AsyncStream<Int32>
    // Kept alive for as long as the watcher; never mutated after init.
    private let sources: [any DispatchSourceSignal]

    init(_ signals: [Int32]) {
        let (stream, cont) = AsyncStream.makeStream(of: Int32.self)
        self.stream = stream
        self.sources = signals.map { sig in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { cont.yield(sig) }
            s.resume()
            return s
        }
    }

    func wait() async {
        for await _ in stream { return }
    }
}

/// VmRSS of a process (this one by default), from /proc.
func residentKiB(pid: Int32? = nil) -> UInt64? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid.map { "\($0)" } ?? "self")/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return UInt64(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
    return nil
}
