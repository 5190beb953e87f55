import CSyscalls
import Distros
import Foundation
import HostCompute
import Logging
import NIOCore
import NIOPosix
import Settings
import Shares
import Synchronization
import Wire

/// The one utility VM of this uvmd: boots it on demand through libvirt, keeps the HTTP/2 link to
/// its agent, learns of its death from libvirt's lifecycle events, and shuts it down cleanly.
public actor VMController {
    public enum State: String, Sendable { case stopped = "Stopped", starting = "Starting", running = "Running", stopping = "Stopping" }

    struct Running {
        var domain: VMDomain
        var agent: GuestAgentClient
        var linkChannel: Channel
        var accel: AcceleratorChoice
        var guest: GuestInfo
        var bootedAt: ContinuousClock.Instant
        var generation: Int
        /// Serials of the distro disks attached to this VM (at boot, or hot-plugged since).
        var disks: Set<String> = []
        /// Where its boot spent its time (nil for a VM adopted from an earlier uvmd).
        var boot: BootPhases? = nil
        var firmware: String? = nil
    }

    let paths: Paths
    let settings: Settings
    let logger: Logger
    private(set) var state: State = .stopped
    private var running: Running?
    private var boot: Task<Running, Error>?
    private var connection: LibvirtConnection?
    private var eventWatcher: Task<Void, Never>?
    private var generation = 0
    /// Why the last VM went away, for the sessions it took with it.
    private(set) var lastStopReason: String?
    /// How the last requested stop ended (`uvm status`, `uvm stop`).
    private(set) var lastStopOutcome: String?
    private var stopRequested = false
    /// Tasks waiting for the VM to stop, by id, so that a bounded wait can withdraw its own.
    private var stoppedWaiters: [Int: CheckedContinuation<Bool, Never>] = [:]
    private var nextWaiterID = 0
    let shares: ShareService
    /// A VM left behind by an earlier uvmd, being taken over (see `adoptLeftover`).
    private var adopting: Task<Void, Never>?
    /// The stopped VM's shares being let go of: the next boot waits for it, so that the old VM's
    /// teardown cannot stop the new VM's exports or take its shared memory away.
    private var sharesStopping: Task<Void, Never>?
    /// Checks that the running guest still answers (see `watchGuest`).
    private var watchdog: Task<Void, Never>?

    /// The VM coming and going, for the idle reaper.
    public enum Lifecycle: Sendable { case started(instances: [String]), stopped }
    public nonisolated let lifecycle: AsyncStream<Lifecycle>
    private let lifecycleSink: AsyncStream<Lifecycle>.Continuation
    let forwarder: PortForwarder?

    init(paths: Paths, settings: Settings, logger: Logger, forwarder: PortForwarder? = nil) {
        self.paths = paths
        self.settings = settings
        self.logger = logger
        self.shares = ShareService(paths: paths, settings: settings, logger: logger)
        (lifecycle, lifecycleSink) = AsyncStream.makeStream(of: Lifecycle.self)
        self.forwarder = forwarder
    }

    /// The agent of the running guest, if the VM runs (boots nothing).
    var runningAgent: GuestAgentClient? { state == .running ? running?.agent : nil }

    /// The agent of a running guest, booting the VM first when needed.
    func agent(progress: @escaping @Sendable (String) async -> Void) async throws -> GuestAgentClient {
        try await ensureRunning(progress: progress).agent
    }

    /// `startingFor`: the distro whose command made this call; a boot it causes starts that
    /// distro's instance during the VM's set-up (see `StartInstanceRequest`).
    func ensureRunning(startingFor: String? = nil, progress: @escaping @Sendable (String) async -> Void) async throws -> Running {
        if let adopting { await adopting.value }
        // A VM being stopped (the reaper, `uvm stop`) still has its link, but is powering off: a
        // command that arrives now waits for the stop and boots a fresh VM, rather than starting
        // in the old one and being killed with it.
        // A stop always ends (see `stop`), so this wait does too.
        while state == .stopping { _ = await waitUntilStopped(timeout: .seconds(60)) }
        if let r = running {
            if r.linkChannel.isActive { return r }
            // QEMU died and libvirt's event has not arrived yet: that VM is over, boot another.
            logger.warning("the link to the guest is gone: treating the VM as stopped")
            await destroyBounded(r.domain)
            markStopped(generation: r.generation)
            if let running { return running }
        }
        if state == .stopping {
            _ = await waitUntilStopped(timeout: .seconds(60))
        }
        if let boot { return try await boot.value }
        state = .starting
        stopRequested = false
        lastStopReason = nil
        let task = Task { try await self.bootVM(startingFor: startingFor, progress: progress) }
        boot = task
        do {
            let r = try await task.value
            boot = nil
            running = r
            state = .running
            watchGuest(r)
            lifecycleSink.yield(.started(instances: r.guest.instances))
            await forwarder?.start(agent: r.agent)
            return r
        } catch {
            boot = nil
            state = .stopped
            throw error
        }
    }

    private func libvirt() async throws -> LibvirtConnection {
        if let connection { return connection }
        let c: LibvirtConnection
        let uri = settings.libvirtURI
        do {
            // A stuck libvirtd accepts the connection and never answers: bounded.
            c = try await withTimeout(seconds: 30, what: "libvirt at \(uri) to answer (is libvirtd stuck? restart it)") {
                try await LibvirtConnection.open(uri: uri)
            }
        } catch {
            throw WireError(.vmUnavailable, "\(error)")
        }
        connection = c
        eventWatcher?.cancel()
        eventWatcher = Task { [weak self] in
            for await event in c.events {
                await self?.handle(event)
            }
            await self?.libvirtConnectionLost()
        }
        return c
    }

    private func bootVM(startingFor: String?, progress: @escaping @Sendable (String) async -> Void) async throws -> Running {
        let requested = ContinuousClock.now
        let fm = FileManager.default
        let kernel = Paths.bootImage(for: settings.kernel ?? paths.kernel)
        guard fm.fileExists(atPath: kernel) else {
            let fix = settings.kernel == nil ? "run `make kernel`" : "run `make kernel`, or fix the kernel setting (`uvm config show` says where it is set)"
            throw WireError(.vmUnavailable, "the uvm kernel is not built (expected \(kernel)): \(fix)")
        }
        guard fm.fileExists(atPath: paths.initramfs) else {
            throw WireError(.vmUnavailable, "the uvm initramfs is not built (expected \(paths.initramfs)): run `make images`")
        }
        let distros = try await prepareDistroDisks()
        await sharesStopping?.value
        let preference = AcceleratorPreference(rawValue: settings.accel) ?? .auto
        let accel: AcceleratorChoice
        do {
            // The probe opens a libvirt connection (blocking, and a stuck libvirtd never
            // answers): on the thread pool, bounded, not on this actor's executor.
            let uri = settings.libvirtURI
            accel = try await withTimeout(seconds: 30, what: "libvirt at \(uri) to say whether KVM domains work (is libvirtd stuck?)") {
                try await NIOThreadPool.singleton.runIfActive { try chooseAccelerator(preference, probe: .live(uri: uri)) }
            }
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError(.vmUnavailable, "\(error)")
        }
        let conn = try await libvirt()
        // A VM of ours left behind by an earlier uvmd (killed, crashed) would hold the disks.
        if let stale = try? await conn.lookup(name: paths.domainName) {
            logger.warning("destroying a VM left behind by an earlier uvmd", metadata: ["domain": "\(paths.domainName)"])
            await destroyBounded(stale)
        }
        try fm.createDirectory(atPath: paths.runDir, withIntermediateDirectories: true)
        try? fm.removeItem(atPath: paths.controlSocket)
        try? fm.removeItem(atPath: paths.consoleLog)

        saveBootRecord(accel)

        var cmdline = "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init " + Self.apicTimerClock
        if !settings.kernelCommandLine.isEmpty { cmdline += " " + settings.kernelCommandLine }
        var spec = VMSpec(
            name: paths.domainName, accelerator: accel.accelerator,
            memoryMiB: settings.memoryMiB, vcpus: settings.processors,
            kernel: kernel, initrd: paths.initramfs, cmdline: cmdline,
            disks: distros.map { VMSpec.Disk(path: $0.disk, serial: diskSerial($0.name)) },
            channels: [VMSpec.Channel(name: "uvm.control", socketPath: paths.controlSocket)]
                + ShareService.slots(paths).map { VMSpec.Channel(name: $0.port, socketPath: $0.socketPath) },
            consoleLog: paths.consoleLog, userNetwork: true,
            processIdentity: .forConnection(uri: settings.libvirtURI))
        spec.hotplugSlots = Self.hotplugSlots
        do {
            spec.firmware = try Firmware.image(for: settings.firmware)
        } catch {
            throw WireError(.vmUnavailable, error.description)
        }
        // Swap: a fresh sparse file each boot (nothing in it outlives the VM), on the host's disk.
        let swap = await prepareSwap()
        if let swap { spec.disks.append(VMSpec.Disk(path: swap, serial: Self.swapSerial, fixed: true)) }
        // The 9P rings' shared memory: QEMU connects to its server when the domain starts. Without
        // it (or with UVM_9P_TRANSPORT=port) shares go through the virtio-serial ports.
        var transport: ShmTransport?
        if !settings.ninePOverPorts {
            do {
                // Zero copy: guest RAM in a shared memfd that uvmd maps (found through QEMU's pid).
                let ram = settings.ninePZeroCopy ? UInt64(spec.memoryMiB) << 20 : nil
                let t = try ShmTransport(socketPath: paths.ninePSharedMemorySocket, channels: ShareService.portCount,
                                         guestRAMBytes: ram)
                spec.sharedMemory = [VMSpec.SharedMemory(name: "uvm-9p", serverPath: t.socketPath, vectors: t.channels)]
                spec.sharedGuestMemory = ram != nil
                transport = t
            } catch {
                logger.warning("9P over shared memory unavailable, using virtio-serial", metadata: ["error": "\(error)"])
            }
        }
        // Benchmarks only: QEMU's own virtio-9p on the same guest, to compare with our server.
        if let dir = settings.benchVirtio9PDir {
            spec.filesystems = [VMSpec.Filesystem(source: dir, tag: "bench9p")]
        }
        await progress("uvm: starting the VM (\(accel.accelerator.rawValue.uppercased()): \(accel.reason))")
        logger.info("booting", metadata: ["accel": "\(accel)", "domain": "\(spec.name)"])
        let started = ContinuousClock.now
        let domain: VMDomain
        do {
            domain = try await conn.createTransient(xml: domainXML(for: spec))
        } catch {
            throw WireError(.vmUnavailable, "libvirt could not start the VM: \(error)")
        }
        let created = ContinuousClock.now
        generation += 1
        let gen = generation
        do {
            let (channel, mux) = try await connectControl(domain: domain)
            let guest = try await withTimeout(seconds: settings.bootTimeoutSeconds, what: "the guest agent to answer") {
                try await GuestAgentClient(link: mux).info()
            }
            let agent = GuestAgentClient(link: mux).knowing(guest)
            // Our own initramfs, built by another uvm version: say what to rebuild.
            if agent.incompatibility != nil {
                throw WireError(.versionMismatch, "the guest agent in \(paths.initramfs) speaks uvm protocol \(guest.protocolVersion ?? WireVersion.unversioned), this uvmd \(WireVersion.current): rebuild it with this uvm (`make`)")
            }
            let answered = ContinuousClock.now
            logger.info("guest up", metadata: ["kernel": "\(guest.kernelRelease)", "boot": "\(answered - started)"])
            channel.closeFuture.whenComplete { _ in
                Task { await self.linkClosed(generation: gen) }
            }
            if let transport, !transport.connected {
                logger.warning("QEMU did not take the 9P shared memory: shares use virtio-serial")
            }
            // The instance the command waits for starts while the rest is set up (an exec that
            // comes first joins that start); a failure is the exec's to report, when it retries.
            let logger = logger, policy = memoryPolicy
            if let distro = startingFor, spec.disks.contains(where: { $0.serial == diskSerial(distro) }) {
                Task {
                    do { try await agent.startInstance(distro) } catch {
                        logger.debug("starting the instance early failed", metadata: ["distro": "\(distro)", "error": "\(error)"])
                    }
                }
            }
            // Swap and the memory policy concern no command: they go beside the shares.
            async let tuned: Void = {
                if swap != nil {
                    do {
                        _ = try await withTimeout(seconds: 20, what: "the guest to turn swap on") { try await agent.call(SwapOnRequest(serial: Self.swapSerial)) }
                    } catch {
                        logger.warning("the VM runs without swap", metadata: ["error": "\(error)"])
                    }
                }
                await Self.applyMemoryPolicy(policy, agent, logger: logger)
            }()
            await shares.vmStarted(agent: agent, transport: transport)
            await tuned
            let ready = ContinuousClock.now
            let guestSide = (answered - created).inSeconds  // firmware + kernel + agent
            let kernel = guest.initStartedSeconds
            let boot = BootPhases(
                prepare: (started - requested).inSeconds, libvirt: (created - started).inSeconds,
                firmware: max(0, guestSide - guest.uptimeSeconds), kernel: kernel,
                agent: kernel.map { guest.uptimeSeconds - $0 }, setup: (ready - answered).inSeconds,
                total: (ready - requested).inSeconds)
            logger.info("boot phases", metadata: ["seconds": "\(boot)"])
            return Running(domain: domain, agent: agent, linkChannel: channel, accel: accel, guest: guest,
                           bootedAt: started, generation: gen, disks: Set(spec.disks.map(\.serial)), boot: boot, firmware: spec.firmware)
        } catch {
            await destroyBounded(domain)
            let tail = consoleTail()
            // Kept whole, and its end in uvmd's log.
            keepFailedConsole()
            logger.error("the VM did not come up", metadata: ["error": "\(error)", "console": "\(tail)"])
            throw WireError(.vmUnavailable, "the VM did not come up: \(error)" + (tail.isEmpty ? "" : "\nconsole (\(paths.consoleLog)):\n\(tail)"))
        }
    }

    /// The local APIC timer's input clock is 1 GHz under QEMU, TCG and KVM alike: given it, our
    /// kernel (patch 0007) does not measure it at every boot, which under TCG took ~0.11 s.
    static let apicTimerClock = "apic_timer_hz=1000000000"

    /// QEMU creates the control socket before libvirt returns; the guest opens its end later,
    /// and until then what we send waits in the port.
    private func connectControl(domain: VMDomain, attempts: Int = 200) async throws -> (Channel, HTTP2Sessions.ClientMultiplexer) {
        var lastError: Error?
        for _ in 0..<attempts {
            do {
                let result = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connect(unixDomainSocketPath: paths.controlSocket) { channel in
                        HTTP2Sessions.configureClient(channel).map { (channel, $0) }
                    }
                return result
            } catch {
                lastError = error
                try await Task.sleep(for: .milliseconds(25))
            }
        }
        throw WireError(.vmUnavailable, "cannot connect to the guest control port \(paths.controlSocket): \(lastError.map { "\($0)" } ?? "?")")
    }

    /// Which distros exist and where their disks are.
    nonisolated var distros: DistroStore { DistroStore(paths: paths, settings: settings) }

    /// Every installed distro's disk is attached; a distro built by `make images` but not yet
    /// installed for this user is installed (copied) first, as WSL imports a distro. The copy
    /// runs on NIO's thread pool, not in this actor.
    private func prepareDistroDisks() async throws -> [DistroStore.Distro] {
        let store = distros, logger = logger
        do {
            return try await NIOThreadPool.singleton.runIfActive {
                let wasInstalled = Set(store.installed().map(\.name))
                let all = try store.prepareForBoot()
                for d in all where !wasInstalled.contains(d.name) { logger.info("installed distro", metadata: ["distro": "\(d.name)"]) }
                return all
            }
        } catch let e as DistroStore.InstallError {
            throw WireError(.vmUnavailable, e.description)
        }
    }

    /// Whether `name` is a distro this VM can run.
    func knowsDistro(_ name: String) -> Bool { distros.knows(name) }

    // MARK: stopping

    /// Clean shutdown: the agent stops instances, syncs and powers off; only if that does not
    /// finish in time is the domain destroyed.
    public func stop(reason: String = "uvm stop") async {
        if let adopting { await adopting.value }
        if let boot { _ = try? await boot.value }
        guard let r = running else { return }
        state = .stopping
        stopRequested = true
        lastStopReason = "session ended: the VM was stopped (\(reason))"
        logger.info("stopping the VM", metadata: ["reason": "\(reason)"])
        var outcome = "powered off cleanly"
        do {
            try await withTimeout(seconds: 20, what: "the guest to power off") {
                try await r.agent.shutdown()
            }
        } catch {
            logger.warning("clean shutdown failed, destroying", metadata: ["error": "\(error)"])
            outcome = "destroyed: the guest did not power off (\(error))"
            await destroyBounded(r.domain)
        }
        // libvirt's `stopped` event ends the wait; without it (libvirtd stuck or restarted) the
        // domain is destroyed and the VM counts as stopped all the same: a stop always ends.
        if await !waitUntilStopped(timeout: .seconds(15)) {
            logger.warning("the VM did not power off in time (or libvirt did not say so), destroying")
            if outcome.hasPrefix("powered off") { outcome = "destroyed: libvirt did not report the VM stopped within 15 s (is libvirtd stuck?)" }
            await destroyBounded(r.domain)
            markStopped(generation: r.generation)
        }
        lastStopOutcome = outcome
    }

    /// virDomainDestroy, given up after 10 s: a hung libvirtd must not hang a stop. (Its keepalive
    /// closes such a connection within ~20 s, failing the call; `libvirtConnectionLost` follows.)
    private func destroyBounded(_ domain: VMDomain) async {
        do {
            try await withTimeout(seconds: 10, what: "libvirt to destroy the VM") { try await domain.destroy() }
        } catch {
            logger.warning("could not destroy the VM", metadata: ["error": "\(error)"])
        }
    }

    /// Waits until the VM is stopped; false when `timeout` passed first.
    private func waitUntilStopped(timeout: Duration) async -> Bool {
        if state == .stopped { return true }
        let id = nextWaiterID
        nextWaiterID += 1
        return await withCheckedContinuation { c in
            stoppedWaiters[id] = c
            Task {
                try? await Task.sleep(for: timeout)
                self.expireWaiter(id)
            }
        }
    }

    private func expireWaiter(_ id: Int) {
        stoppedWaiters.removeValue(forKey: id)?.resume(returning: false)
    }

    private func markStopped(generation gen: Int, reason: String? = nil) {
        guard let r = running, r.generation == gen else { return }
        running = nil
        state = .stopped
        watchdog?.cancel()
        watchdog = nil
        if !stopRequested { lastStopReason = reason ?? "session ended: the VM stopped unexpectedly (QEMU exited; see \(paths.consoleLog))" }
        r.linkChannel.close(promise: nil)
        let shares = shares, previous = sharesStopping
        sharesStopping = Task {
            await previous?.value
            await shares.vmStopped()
        }
        logger.info("VM stopped", metadata: ["reason": "\(lastStopReason ?? "?")"])
        let waiters = stoppedWaiters.values
        stoppedWaiters = [:]
        waiters.forEach { $0.resume(returning: true) }
        lifecycleSink.yield(.stopped)
    }

    /// Ends `lifecycle` (uvmd exiting).
    public nonisolated func finishLifecycle() { lifecycleSink.finish() }

    /// Whether a stop was asked for (`uvm stop`, the reaper, uvmd exiting) and is under way.
    var isStopping: Bool { state == .stopping && stopRequested }

    /// What keeps an idle instance running (its `[boot] keepAlive = services`), from the agent;
    /// nothing when it cannot say.
    func keptBy(_ distro: String) async -> [String] {
        guard let r = running else { return [] }
        return (try? await withTimeout(seconds: 10, what: "the guest to say what \(distro) runs") {
            try await r.agent.call(InstanceActivityRequest(name: distro))
        })?.keptBy ?? []
    }

    /// Stops one distro instance through the agent (the idle reaper's instance stop). A systemd
    /// instance gets 30 s to stop its units (the agent's bound) before it is killed.
    func stopInstance(_ distro: String) async {
        guard let r = running else { return }
        do {
            try await withTimeout(seconds: 45, what: "instance \(distro) to stop") {
                try await r.agent.stopInstance(distro)
            }
            logger.info("instance stopped (idle)", metadata: ["distro": "\(distro)"])
        } catch {
            logger.warning("could not stop instance", metadata: ["distro": "\(distro)", "error": "\(error)"])
        }
    }

    // MARK: swap

    static let swapSerial = "uvm.swap"

    /// `[vm] autoMemoryReclaim`, which the agent applies by itself from the guest's CPU use, and
    /// free page reporting's pace.
    nonisolated var memoryPolicy: MemoryPolicyRequest {
        let d = settings.autoMemoryReclaimDelay.components
        let pace = settings.pageReporting
        return MemoryPolicyRequest(mode: MemoryReclaimMode(rawValue: settings.autoMemoryReclaim) ?? .dropCache,
                                   idleDelayMilliseconds: Int(min(d.seconds, 100_000) * 1000 + d.attoseconds / 1_000_000_000_000_000),
                                   reportingOrder: pace.order, reportingDelayMilliseconds: pace.delayMilliseconds,
                                   reportingBudgetDivisor: pace.budgetDivisor)
    }

    /// A guest that cannot take the policy still runs; the log says why.
    private static func applyMemoryPolicy(_ policy: MemoryPolicyRequest, _ agent: GuestAgentClient, logger: Logger) async {
        do {
            _ = try await withTimeout(seconds: 20, what: "the guest to take the memory policy") { try await agent.call(policy) }
        } catch {
            logger.warning("the guest did not take the memory policy", metadata: ["error": "\(error)"])
        }
    }

    /// The swap file for this boot, made anew (sparse, `mkswap`ed), or nil without swap. A swap
    /// that cannot be made is logged and skipped: the VM boots without it.
    private func prepareSwap() async -> String? {
        let mib = settings.effectiveSwapMiB
        let path = settings.swapFile ?? "\(paths.dataDir)/swap.img"
        guard mib > 0 else {
            unlink(path)  // an earlier boot's
            return nil
        }
        do {
            try await NIOThreadPool.singleton.runIfActive {
                try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                unlink(path)
                let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw WireError(.internalError, "cannot create \(path): \(String(cString: strerror(errno)))") }
                let sized = ftruncate(fd, off_t(mib) << 20)
                close(fd)
                guard sized == 0 else { throw WireError(.internalError, "cannot size \(path) to \(mib) MiB") }
                try runHostTool(["mkswap", "-q", path], what: "mkswap \(path)")
            }
            return path
        } catch {
            logger.warning("no swap this boot", metadata: ["file": "\(path)", "error": "\(error)"])
            return nil
        }
    }

    // MARK: distro disks while the VM runs

    /// Empty PCIe slots for disks added while the VM runs (distros imported or first used after boot).
    /// (An import takes two for a moment: the new disk and the tar it is filled from.)
    static let hotplugSlots = 5
    private var diskOperation: Task<Void, Never>?
    /// Serials of spool disks (imports' and exports' tars), counted.
    private var spoolDisks = 0

    /// Makes `distro` runnable in the running VM (booting it if needed) and returns its agent: installed from its
    /// template if it has only that (busybox, once another distro is the default), and its disk
    /// attached. Works on the VM `ensureRunning` returns, which a concurrent boot may not have
    /// made `running` yet.
    @discardableResult
    func prepareDisk(_ distro: String, progress: @escaping @Sendable (String) async -> Void) async throws -> GuestAgentClient {
        let r = try await ensureRunning(startingFor: distro, progress: progress)
        if isAttached(diskSerial(distro), r) { return r.agent }
        let store = distros
        if case .template(let template) = store.availability(distro) {
            await progress("uvm: installing \(distro)")
            do {
                try await NIOThreadPool.singleton.runIfActive { try store.install(distro, from: template) }
            } catch {
                throw WireError(.vmUnavailable, "\(error)")
            }
        }
        try await ensureDiskAttached(distro, in: r)
        return r.agent
    }

    private func isAttached(_ serial: String, _ r: Running) -> Bool {
        (running?.generation == r.generation ? running?.disks : r.disks)?.contains(serial) == true
    }

    /// Attaches `distro`'s disk to the running VM unless it is attached already (hot-plug), so that
    /// a distro imported or first used after boot runs without restarting the VM.
    func ensureDiskAttached(_ distro: String, in given: Running? = nil) async throws {
        guard let r = given ?? running else { throw WireError(.vmStopped, "the VM is not running") }
        let disk = VMSpec.Disk(path: paths.distroDisk(distro), serial: diskSerial(distro))
        if isAttached(disk.serial, r) { return }
        try await attach(disk, what: "the disk of \(distro)", in: r)
    }

    /// Attaches `path` under a serial of its own and returns that serial: read-only for an
    /// import's tar, writable for an export's.
    func attachSpool(_ path: String, what: String, writable: Bool = false) async throws -> String {
        guard let r = running else { throw WireError(.vmStopped, "the VM is not running") }
        spoolDisks += 1
        // Distro serials are `uvm-NAME`; a name cannot hold this one's dots at its start.
        let disk = VMSpec.Disk(path: path, serial: "uvm.\(writable ? "dst" : "src").\(spoolDisks)", readOnly: !writable)
        try await attach(disk, what: what, in: r)
        return disk.serial
    }

    /// Disk hot-plugs one at a time: each picks a free target name from what libvirt reports.
    private func attach(_ disk: VMSpec.Disk, what: String, in r: Running) async throws {
        let previous = diskOperation
        let task = Task<Result<Void, Error>, Never> {
            await previous?.value
            do {
                try await self.attachNow(disk, what: what, in: r)
                return .success(())
            } catch {
                return .failure(error)
            }
        }
        diskOperation = Task { _ = await task.value }
        try await task.value.get()
    }

    private func attachNow(_ disk: VMSpec.Disk, what: String, in r: Running) async throws {
        if isAttached(disk.serial, r) { return }
        let described = try await withTimeout(seconds: 10, what: "libvirt to describe the VM") { try await r.domain.disks() }
        if !described.contains(where: { $0.serial == disk.serial }) {
            let used = Set(described.map(\.dev))
            guard let index = (0..<702).first(where: { !used.contains(virtioDiskName($0)) }) else {
                throw WireError(.vmUnavailable, "no free disk name for \(what)")
            }
            let xml = diskXML(disk, index: index)
            do {
                try await withTimeout(seconds: 30, what: "libvirt to attach \(what)") { try await r.domain.attachDevice(xml: xml) }
            } catch {
                throw WireError(.vmUnavailable, "cannot attach \(what) to the running VM (at most \(Self.hotplugSlots) disks can be added while it runs; `uvm stop` makes room): \(error)")
            }
            logger.info("disk attached", metadata: ["serial": "\(disk.serial)", "dev": "\(virtioDiskName(index))"])
        }
        if running?.generation == r.generation { running?.disks.insert(disk.serial) }
    }

    /// Whether libvirt still lists `distro`'s disk in the running VM.
    func isDiskAttached(_ distro: String) async -> Bool {
        guard let r = running else { return false }
        let described = try? await withTimeout(seconds: 10, what: "libvirt to describe the VM") { try await r.domain.disks() }
        return described?.contains(where: { $0.serial == diskSerial(distro) }) ?? true
    }

    /// Detaches `distro`'s disk from the running VM (after the guest let go of it).
    func detachDisk(_ distro: String) async {
        await detach(VMSpec.Disk(path: paths.distroDisk(distro), serial: diskSerial(distro)))
    }

    /// Whether the running VM has a disk with this serial (as far as uvmd knows).
    func isAttached(serial: String) -> Bool { running?.disks.contains(serial) == true }

    /// Detaches a disk attached with `attachSpool`.
    func detachSpool(_ path: String, serial: String) async {
        await detach(VMSpec.Disk(path: path, serial: serial, readOnly: serial.hasPrefix("uvm.src.")))
    }

    /// Bounded: the guest's side of an unplug can be slow, and the disk goes with the VM's stop anyway.
    private func detach(_ disk: VMSpec.Disk) async {
        guard let r = running else { return }
        let previous = diskOperation
        let task = Task<Void, Never> {
            await previous?.value
            guard let described = try? await withTimeout(seconds: 10, what: "libvirt to describe the VM", { try await r.domain.disks() }),
                  let dev = described.first(where: { $0.serial == disk.serial })?.dev,
                  let index = (0..<702).first(where: { virtioDiskName($0) == dev }) else { return }
            let xml = diskXML(disk, index: index)
            do {
                try await withTimeout(seconds: 20, what: "libvirt to detach disk \(disk.serial)") { try await r.domain.detachDevice(xml: xml) }
            } catch {
                self.logger.warning("could not detach a disk; it goes with the VM", metadata: ["serial": "\(disk.serial)", "error": "\(error)"])
            }
        }
        diskOperation = task
        await task.value
        if running?.generation == r.generation { running?.disks.remove(disk.serial) }
    }

    // MARK: a VM left behind

    /// At uvmd's start: a VM of ours still running (uvmd was killed, crashed) is adopted when its
    /// agent answers, else destroyed, so that no QEMU is left without a uvmd. Commands wait.
    public func adoptLeftover() {
        guard adopting == nil, running == nil, boot == nil else { return }
        state = .starting
        adopting = Task {
            await self.adopt()
            self.adoptionDone()
        }
    }

    private func adoptionDone() {
        adopting = nil
        if running == nil && state == .starting { state = .stopped }
    }

    private func adopt() async {
        guard let conn = try? await libvirt(), let domain = try? await conn.lookup(name: paths.domainName) else { return }
        logger.info("found a VM left behind by an earlier uvmd", metadata: ["domain": "\(paths.domainName)"])
        do {
            let (channel, mux) = try await connectControl(domain: domain, attempts: 40)
            let guest = try await withTimeout(seconds: 10, what: "the guest agent of the VM left behind") {
                try await GuestAgentClient(link: mux).info()
            }
            let agent = GuestAgentClient(link: mux).knowing(guest)
            // Left by another uvm version: kept (the user's processes live in it), but only
            // stopped; `uvm stop` ends it and the next command boots this version's guest.
            if let e = agent.incompatibility { logger.warning("adopted VM speaks another protocol", metadata: ["error": "\(e)"]) }
            generation += 1
            let gen = generation
            channel.closeFuture.whenComplete { _ in
                Task { await self.linkClosed(generation: gen) }
            }
            let accel = loadBootRecord() ?? AcceleratorChoice(accelerator: .tcg, reason: "adopted; accelerator unknown")
            let attached = (try? await withTimeout(seconds: 10, what: "libvirt to describe the VM") { try await domain.disks() }) ?? []
            let r = Running(domain: domain, agent: agent, linkChannel: channel, accel: accel, guest: guest,
                            bootedAt: .now - .milliseconds(Int64(guest.uptimeSeconds * 1000)), generation: gen,
                            disks: Set(attached.compactMap(\.serial)))
            running = r
            state = .running
            stopRequested = false
            watchGuest(r)
            // The earlier uvmd's 9P servers went with it: serve the shares again and remount them,
            // through the virtio-serial ports (the shared memory's server went with it too, and
            // QEMU cannot connect to a new one).
            await Self.applyMemoryPolicy(memoryPolicy, agent, logger: logger)
            await shares.vmStarted(agent: agent, transport: nil)
            await forwarder?.start(agent: agent)
            logger.info("adopted the VM", metadata: ["instances": "\(guest.instances)", "qemu": "\(domain.qemuPID().map { "\($0)" } ?? "?")"])
            lifecycleSink.yield(.started(instances: guest.instances))
        } catch {
            logger.warning("the VM left behind does not answer: destroying it", metadata: ["error": "\(error)"])
            await destroyBounded(domain)
        }
    }

    /// What `uvm status` of an adopted VM needs and libvirt does not say.
    private struct BootRecord: Codable { var accelerator: String; var reason: String }

    private func saveBootRecord(_ accel: AcceleratorChoice) {
        let data = try? JSONEncoder().encode(BootRecord(accelerator: accel.accelerator.rawValue, reason: accel.reason))
        _ = FileManager.default.createFile(atPath: "\(paths.runDir)/boot.json", contents: data)
    }

    private func loadBootRecord() -> AcceleratorChoice? {
        guard let data = FileManager.default.contents(atPath: "\(paths.runDir)/boot.json"),
              let r = try? JSONDecoder().decode(BootRecord.self, from: data),
              let a = Accelerator(rawValue: r.accelerator) else { return nil }
        return AcceleratorChoice(accelerator: a, reason: r.reason)
    }

    private func handle(_ event: DomainEvent) {
        // Same name, other UUID: the previous VM's late event, not this one's.
        guard event.domainName == paths.domainName, let r = running, event.domainUUID == r.domain.uuid else { return }
        // `shutdown` (the guest powering off) is followed by `stopped`; wait for that.
        if event.kind == .stopped || event.kind == .crashed { markStopped(generation: r.generation) }
    }

    private func linkClosed(generation gen: Int) async {
        // The control connection only ends with the VM (QEMU holds the socket), so treat it as
        // the VM's end even if libvirt's event is late.
        guard let r = running, r.generation == gen else { return }
        // On a requested stop, the domain is gone only when libvirt says so (`stopped`): until
        // then it still holds its name and disks, and the next boot would have to wait for it.
        // Without a libvirt connection no event can come: QEMU has gone, and that is the end.
        if stopRequested && connection != nil { return }
        if !stopRequested { await destroyBounded(r.domain) }
        markStopped(generation: gen)
    }

    /// A guest that stops answering (its kernel hung, its agent wedged) while QEMU lives on would
    /// hold every session, and every later command, for ever: nothing else ends them. So the agent
    /// is asked for its info every few seconds; when it has not answered for
    /// `settings.guestWatchdogSeconds`, QEMU is killed (a hung guest has nothing left to flush)
    /// and its sessions end saying why. The next command boots a fresh VM.
    private func watchGuest(_ r: Running) {
        watchdog?.cancel()
        let limit = settings.guestWatchdogSeconds
        guard limit > 0 else { return }
        let agent = r.agent, gen = r.generation, interval = max(limit / 6, 1)
        watchdog = Task { [weak self] in
            var lastAnswer = ContinuousClock.now
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(interval))
                guard let self, await self.isRunning(generation: gen), !Task.isCancelled else { return }
                // Any reply counts, an error too (an agent of another uvm version may fail to
                // describe itself): only silence is a hang.
                let answered = (try? await withTimeout(seconds: interval * 2, what: "the guest agent to answer") {
                    _ = try? await agent.info()
                    return true
                }) ?? false
                if answered {
                    lastAnswer = .now
                } else if ContinuousClock.now - lastAnswer >= .seconds(limit) {
                    await self.guestStoppedAnswering(generation: gen, after: limit)
                    return
                }
            }
        }
    }

    /// Copies the console log of a VM that failed beside it (the next boot overwrites the log);
    /// returns where.
    @discardableResult
    private func keepFailedConsole() -> String {
        let kept = paths.consoleLog + ".failed"
        try? FileManager.default.removeItem(atPath: kept)
        try? FileManager.default.copyItem(atPath: paths.consoleLog, toPath: kept)
        return kept
    }

    private func isRunning(generation gen: Int) -> Bool {
        state == .running && running?.generation == gen
    }

    private func guestStoppedAnswering(generation gen: Int, after seconds: Double) async {
        guard isRunning(generation: gen), let r = running else { return }
        let why = "the VM stopped responding (its agent did not answer for \(Int(seconds)) s)"
        logger.error("\(why): killing QEMU", metadata: ["qemu": "\(r.domain.qemuPID().map { "\($0)" } ?? "?")"])
        // Its console says what the guest was doing.
        let console = keepFailedConsole()
        markStopped(generation: gen, reason: "session ended: \(why); its console is in \(console)")
        if let pid = r.domain.qemuPID() { kill(pid, SIGKILL) }
        await destroyBounded(r.domain)
    }

    /// libvirtd died, restarted or stopped answering keepalives: the next call reconnects. A VM
    /// whose link is already gone will get no `stopped` event on this connection: it is over.
    private func libvirtConnectionLost() {
        logger.warning("lost the connection to libvirt; reconnecting on next use", metadata: ["uri": "\(settings.libvirtURI)"])
        connection = nil
        if let r = running, !r.linkChannel.isActive { markStopped(generation: r.generation) }
    }

    // MARK: status

    func status(daemonRSSKiB: UInt64?, sessions: Int) async -> VMStatus {
        var s = VMStatus(state: state.rawValue, daemonPID: getpid(), sessions: sessions)
        s.libvirtURI = settings.libvirtURI
        s.domain = paths.domainName
        s.daemonRSSKiB = daemonRSSKiB
        s.lastStop = lastStopOutcome
        guard let r = running else { return s }
        s.accelerator = r.accel.accelerator.rawValue
        s.acceleratorReason = r.accel.reason
        s.qemuPID = r.domain.qemuPID().map { Int32($0) }
        s.qemuRSSKiB = s.qemuPID.flatMap { residentKiB(pid: $0) }
        s.memoryMiB = settings.memoryMiB
        s.boot = r.boot
        if r.boot != nil { s.firmware = r.firmware ?? "seabios" }  // unknown for an adopted VM
        if let g = try? await r.agent.info() {
            s.kernelRelease = g.kernelRelease
            s.uptimeSeconds = g.uptimeSeconds
            s.guestMemTotalKiB = g.memTotalKiB
            s.guestMemAvailableKiB = g.memAvailableKiB
            s.guestMemCachedKiB = g.memCachedKiB
            s.guestSwapTotalKiB = g.swapTotalKiB
            if let t = g.swapTotalKiB, let f = g.swapFreeKiB { s.guestSwapUsedKiB = t >= f ? t - f : 0 }
            s.memoryReclaim = g.memoryReclaim.map { m in
                m == .disabled ? "disabled" : "\(m.rawValue) after \(formatTimeout(settings.autoMemoryReclaimDelay)) idle"
            }
            s.lastReclaim = g.lastReclaim
            s.lastReclaimSecondsAgo = g.lastReclaim.map { max(0, g.uptimeSeconds - $0.atUptimeSeconds) }
        } else {
            s.kernelRelease = r.guest.kernelRelease
        }
        return s
    }

    private func consoleTail() -> String {
        guard let text = try? String(contentsOfFile: paths.consoleLog, encoding: .utf8) else { return "" }
        return text.split(separator: "\n").suffix(15).joined(separator: "\n")
    }
}

func diskSerial(_ distro: String) -> String { "uvm-\(distro)" }

/// Runs `body`, failing with a clear error if it takes longer than `seconds`. Bounded even when
/// `body` ignores cancellation (a libvirt call blocked on a hung daemon): it is cancelled and
/// left to finish on its own, and its result is dropped. A task group would wait for it.
func withTimeout<T: Sendable>(seconds: Double, what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let race = Race<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, Error>) in
            race.start(c)
            let work = Task {
                do { race.finish(.success(try await body())) } catch { race.finish(.failure(error)) }
            }
            let timer = Task {
                try? await Task.sleep(for: .seconds(seconds))
                race.finish(.failure(WireError(.vmUnavailable, "timed out after \(Int(seconds)) s waiting for \(what)")))
            }
            race.onFinish { work.cancel(); timer.cancel() }
        }
    } onCancel: {
        race.finish(.failure(CancellationError()))
    }
}

/// The first of several outcomes resumes the continuation; the others are dropped.
private final class Race<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T, Error>?
        var early: Result<T, Error>?
        var cleanup: (@Sendable () -> Void)?
        var done = false
    }
    private let state = Mutex(State())

    func start(_ c: CheckedContinuation<T, Error>) {
        let early: Result<T, Error>? = state.withLock { s in
            if let e = s.early { s.early = nil; return e }
            s.continuation = c
            return nil
        }
        if let early { c.resume(with: early) }
    }

    /// Runs `cleanup` once the race is decided (at once if it already is).
    func onFinish(_ cleanup: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if s.done { return true }
            s.cleanup = cleanup
            return false
        }
        if now { cleanup() }
    }

    func finish(_ result: Result<T, Error>) {
        let (c, cleanup): (CheckedContinuation<T, Error>?, (@Sendable () -> Void)?) = state.withLock { s in
            if s.done { return (nil, nil) }
            s.done = true
            // Cancelled before `start`: the continuation takes the result when it arrives.
            if s.continuation == nil { s.early = result }
            defer { s.continuation = nil; s.cleanup = nil }
            return (s.continuation, s.cleanup)
        }
        c?.resume(with: result)
        cleanup?()
    }
}
