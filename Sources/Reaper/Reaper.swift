/// The idle reaper (WSL's instanceIdleTimeout and vmIdleTimeout). A client is anything that holds
/// a session with a distro instance: an exec, a shell, a forwarded connection. When the last
/// client of an instance goes, the instance stops after `instanceIdle`; when no instance is left,
/// the VM stops after `vmIdle`. A new client cancels a pending stop. nil disables a timer.
///
/// The reaper only decides when; what stopping means is the caller's (`Actions`).
public actor Reaper {
    /// Held by one client for as long as it uses `distro`; give it back with `end(_:)`.
    public struct Token: Hashable, Sendable {
        public let id: UInt64
        public let distro: String
    }

    public enum InstanceState: String, Sendable, Codable { case running = "Running", stopping = "Stopping" }

    public struct InstanceSnapshot: Sendable, Equatable {
        public var name: String
        public var state: InstanceState
        public var clients: Int
        /// When the idle stop is due, if one is pending.
        public var stopDue: ContinuousClock.Instant?
        /// Idle, but kept running (its `[boot] keepAlive`): by what.
        public var keptBy: [String] = []
    }

    public struct Snapshot: Sendable, Equatable {
        public var vmRunning: Bool
        public var clients: Int
        public var vmStopDue: ContinuousClock.Instant?
        public var instances: [InstanceSnapshot]
    }

    public struct Actions: Sendable {
        /// Stops one instance (processes signalled, file systems synced and unmounted).
        public var stopInstance: @Sendable (_ distro: String) async -> Void
        /// Stops the VM cleanly.
        public var stopVM: @Sendable (_ reason: String) async -> Void
        /// What keeps an idle instance running (empty: nothing, it may stop); asked when its
        /// idle stop is due.
        public var keptBy: @Sendable (_ distro: String) async -> [String]
        public init(stopInstance: @escaping @Sendable (String) async -> Void, stopVM: @escaping @Sendable (String) async -> Void,
                    keptBy: @escaping @Sendable (String) async -> [String] = { _ in [] }) {
            self.stopInstance = stopInstance
            self.stopVM = stopVM
            self.keptBy = keptBy
        }
    }

    public let instanceIdle: Duration?
    public let vmIdle: Duration?
    private var actions: Actions?
    private var nextID: UInt64 = 0
    private var clients: [String: Set<UInt64>] = [:]
    /// Instances that run in the guest as far as we know.
    private var instances: [String: InstanceState] = [:]
    private var instanceTimers: [String: Timer] = [:]
    /// Instances whose idle stop was put off, and why.
    private var kept: [String: [String]] = [:]
    private var vmTimer: Timer?
    private var vmRunning = false

    private struct Timer {
        var due: ContinuousClock.Instant
        var task: Task<Void, Never>
    }

    public init(instanceIdle: Duration?, vmIdle: Duration?) {
        self.instanceIdle = instanceIdle
        self.vmIdle = vmIdle
    }

    public func setActions(_ actions: Actions) { self.actions = actions }

    // MARK: clients

    public func begin(distro: String) -> Token {
        nextID += 1
        clients[distro, default: []].insert(nextID)
        cancelInstanceTimer(distro)
        kept[distro] = nil
        cancelVMTimer()
        // While it stops, the instance stays `stopping`; it runs again once the stop is done.
        if vmRunning && instances[distro] == nil { instances[distro] = .running }
        return Token(id: nextID, distro: distro)
    }

    public func end(_ token: Token) {
        guard clients[token.distro]?.remove(token.id) != nil else { return }
        if clients[token.distro]?.isEmpty == true { clients[token.distro] = nil }
        if clients[token.distro] == nil && instances[token.distro] == .running { scheduleInstanceStop(token.distro) }
        scheduleVMStopIfIdle()
    }

    /// An instance stopped on request (`uvm terminate`, `uvm unregister`), or one that never ran
    /// (an import's disk): not running any more, no idle stop due.
    public func instanceStopped(_ distro: String) {
        cancelInstanceTimer(distro)
        kept[distro] = nil
        instances[distro] = nil
        scheduleVMStopIfIdle()
    }

    public var clientCount: Int { clients.values.reduce(0) { $0 + $1.count } }

    // MARK: the VM

    /// The VM is up, with these instances already running in it (an adopted VM has some).
    public func vmStarted(instances running: [String] = []) {
        vmRunning = true
        for d in running where instances[d] == nil { instances[d] = .running }
        for d in clients.keys where instances[d] == nil { instances[d] = .running }
        for d in instances.keys where clients[d] == nil { scheduleInstanceStop(d) }
        scheduleVMStopIfIdle()
    }

    /// The VM is gone (stopped, crashed, destroyed): so are its instances and their timers.
    public func vmStopped() {
        vmRunning = false
        for d in instanceTimers.keys { cancelInstanceTimer(d) }
        instances.removeAll()
        kept.removeAll()
        cancelVMTimer()
    }

    public func snapshot() -> Snapshot {
        Snapshot(
            vmRunning: vmRunning, clients: clientCount, vmStopDue: vmTimer?.due,
            instances: instances.keys.sorted().map {
                InstanceSnapshot(name: $0, state: instances[$0]!, clients: clients[$0]?.count ?? 0, stopDue: instanceTimers[$0]?.due,
                                 keptBy: kept[$0] ?? [])
            })
    }

    // MARK: timers

    private func scheduleInstanceStop(_ distro: String) {
        guard let idle = instanceIdle, instanceTimers[distro] == nil else { return }
        let due = ContinuousClock.now + idle
        instanceTimers[distro] = Timer(due: due, task: Task { [weak self] in
            try? await Task.sleep(until: due, clock: .continuous)
            if Task.isCancelled { return }
            await self?.instanceTimerFired(distro, due: due)
        })
    }

    private func instanceTimerFired(_ distro: String, due: ContinuousClock.Instant) async {
        // A timer replaced or cancelled in the meantime is not this one.
        guard instanceTimers[distro]?.due == due else { return }
        instanceTimers[distro] = nil
        guard clients[distro] == nil, instances[distro] == .running else { return }
        // Its services or ports keep it: ask again after another idle period.
        let keeping = await actions?.keptBy(distro) ?? []
        guard clients[distro] == nil, instances[distro] == .running, instanceTimers[distro] == nil else { return }
        if !keeping.isEmpty {
            kept[distro] = keeping
            scheduleInstanceStop(distro)
            return
        }
        kept[distro] = nil
        instances[distro] = .stopping
        await actions?.stopInstance(distro)
        // Clients may have come while it stopped: their sessions start it again.
        guard instances[distro] == .stopping else { return }
        instances[distro] = (clients[distro] != nil && vmRunning) ? .running : nil
        scheduleVMStopIfIdle()
    }

    private func cancelInstanceTimer(_ distro: String) {
        instanceTimers.removeValue(forKey: distro)?.task.cancel()
    }

    private func scheduleVMStopIfIdle() {
        guard vmRunning, let idle = vmIdle, vmTimer == nil, clients.isEmpty, instances.isEmpty else { return }
        let due = ContinuousClock.now + idle
        vmTimer = Timer(due: due, task: Task { [weak self] in
            try? await Task.sleep(until: due, clock: .continuous)
            if Task.isCancelled { return }
            await self?.vmTimerFired(due: due)
        })
    }

    private func vmTimerFired(due: ContinuousClock.Instant) async {
        guard vmTimer?.due == due else { return }
        vmTimer = nil
        guard vmRunning, clients.isEmpty, instances.isEmpty, let idle = vmIdle else { return }
        await actions?.stopVM("idle for \(idle.formatted)")
    }

    private func cancelVMTimer() {
        vmTimer?.task.cancel()
        vmTimer = nil
    }
}

extension Duration {
    /// "2s", "500ms", for messages.
    var formatted: String {
        let ms = components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
        return ms % 1000 == 0 ? "\(ms / 1000)s" : "\(ms)ms"
    }
}
