import CSyscalls
import Glibc
import Synchronization
import Wire

/// WSL's `autoMemoryReclaim`, in the guest: once the guest's CPUs have been idle for the policy's
/// delay, give the page cache back (all at once, or in steps through the root memory cgroup), then
/// compact, so that free page reporting hands whole blocks back to the host. It runs here rather
/// than in uvmd because the guest's own /proc/stat is the only honest idle measure (QEMU's CPU time
/// under TCG is mostly emulation), and because it must go on while no uvmd is connected.
final class MemoryReclaimer: Sendable {
    static let shared = MemoryReclaimer()

    private struct State {
        var policy: MemoryPolicyRequest?
        var generation = 0
        var last: ReclaimRecord?
    }
    private let state = Mutex(State())

    var mode: MemoryReclaimMode? { state.withLock { $0.policy?.mode } }
    var lastReclaim: ReclaimRecord? { state.withLock { $0.last } }

    /// Applies a policy (each boot, and again when a new uvmd adopts the VM): the reporting pace
    /// at once, the reclaim loop from now on (replacing the previous one).
    func apply(_ policy: MemoryPolicyRequest) throws {
        guard (0...100_000_000).contains(policy.idleDelayMilliseconds), (0...1000).contains(policy.idlePermille) else {
            throw WireError(.badRequest, "memory policy out of range")
        }
        let params = "/sys/module/page_reporting/parameters"
        if let order = policy.reportingOrder {
            guard (0...10).contains(order) else { throw WireError(.badRequest, "page reporting order \(order) is not 0 to 10") }
            try writeSetting("\(params)/page_reporting_order", "\(order)")
        }
        if let ms = policy.reportingDelayMilliseconds {
            guard (0...60_000).contains(ms) else { throw WireError(.badRequest, "page reporting delay \(ms) ms is not 0 to 60000") }
            try writeSetting("\(params)/delay_ms", "\(ms)")
        }
        if let div = policy.reportingBudgetDivisor {
            guard (1...1024).contains(div) else { throw WireError(.badRequest, "page reporting budget divisor \(div) is not 1 to 1024") }
            try writeSetting("\(params)/budget_div", "\(div)")
        }
        let generation = state.withLock { s in
            s.policy = policy
            s.generation += 1
            return s.generation
        }
        log("memory policy: \(policy.mode.rawValue) after \(policy.idleDelayMilliseconds) ms at <= \(Double(policy.idlePermille) / 10)% CPU")
        guard policy.mode != .disabled else { return }
        Task.detached { await self.watch(policy, generation: generation) }
    }

    private func current(_ generation: Int) -> Bool { state.withLock { $0.generation == generation } }

    /// Samples /proc/stat once a second. The guest is idle when, over the last `window`, all CPUs
    /// were busy at most `idlePermille` of the time, not counting this agent's own work (its port
    /// tracker polls 4 times a second, which under TCG alone is ~1%); after `idleDelay` of that,
    /// reclaims once, and waits for the guest to be busy again before the next time. A window of
    /// several seconds because one sample has too few ticks (100 per CPU per second) to resolve
    /// 0.5%.
    private func watch(_ policy: MemoryPolicyRequest, generation: Int) async {
        let delay = Duration.milliseconds(policy.idleDelayMilliseconds)
        let window = min(max(delay, .seconds(1)), .seconds(10))
        var samples: [(at: ContinuousClock.Instant, cpu: CPUTimes)] = [(.now, CPUTimes.read())]
        var idleSince: ContinuousClock.Instant? = nil
        var armed = true
        while current(generation) {
            try? await Task.sleep(for: .seconds(1))
            let now = ContinuousClock.now, cpu = CPUTimes.read()
            samples.append((now, cpu))
            // Keep one sample at least `window` old to compare with.
            while samples.count > 2, now - samples[1].at >= window { samples.removeFirst() }
            guard now - samples[0].at >= window else { continue }
            let busy = cpu.busyPermille(since: samples[0].cpu) > policy.idlePermille
            if busy {
                idleSince = nil
                armed = true
                continue
            }
            // Idle over the whole window: idle since the window began.
            let since = idleSince ?? samples[0].at
            idleSince = since
            guard armed, now - since >= delay, current(generation) else { continue }
            // Not worth a pass (and not worth dropping what little is cached) below 32 MiB.
            guard MemInfo.read().reclaimableKiB >= 32 * 1024 else { armed = false; continue }
            let record = await reclaim(policy)
            state.withLock { $0.last = record }
            log("memory reclaim (\(record.mode.rawValue)): cache \(record.cacheBeforeKiB / 1024) -> \(record.cacheAfterKiB / 1024) MiB in \(record.milliseconds) ms")
            armed = false
            // The reclaim's own work is not the guest's: start a fresh window.
            samples = [(.now, CPUTimes.read())]
        }
    }

    private func reclaim(_ policy: MemoryPolicyRequest) async -> ReclaimRecord {
        let started = ContinuousClock.now
        let before = MemInfo.read().reclaimableKiB
        // Dirty pages cannot be dropped; a bounded sync first (a 9P server that is gone must not
        // hold the reclaim forever).
        await boundedSync()
        switch policy.mode {
        case .disabled:
            break
        case .dropCache:
            // 3: the page cache and the reclaimable slab (dentries and inodes).
            _ = await onOwnThread(within: .seconds(60), "drop_caches") { _ = writeValue("/proc/sys/vm/drop_caches", "3") }
        case .gradual:
            await reclaimGradually(policy)
        }
        _ = await onOwnThread(within: .seconds(60), "compact_memory") { _ = writeValue("/proc/sys/vm/compact_memory", "1") }
        let after = MemInfo.read().reclaimableKiB
        let uptime = guestUptime()
        let took = ContinuousClock.now - started
        let ms = Int(took.components.seconds * 1000 + took.components.attoseconds / 1_000_000_000_000_000)
        return ReclaimRecord(mode: policy.mode, atUptimeSeconds: uptime, cacheBeforeKiB: before, cacheAfterKiB: after, milliseconds: ms)
    }

    /// A quarter of what is reclaimable per step (at least 16 MiB), through the root cgroup's
    /// memory.reclaim, which takes the least recently used pages first; stops when the kernel
    /// finds no more (EAGAIN), when little is left, or as soon as user space is busy again (the
    /// reclaim's own work is system time, so only user time counts here).
    private func reclaimGradually(_ policy: MemoryPolicyRequest) async {
        let file = MemoryReclaimer.cgroupRoot + "/memory.reclaim"
        var previous = CPUTimes.read()
        for _ in 0..<120 {
            let reclaimable = MemInfo.read().reclaimableKiB
            guard reclaimable >= 16 * 1024 else { return }
            let bytes = max(UInt64(16 << 20), reclaimable * 1024 / 4)
            let failed = Atomic<Int32>(0)
            let finished = await onOwnThread(within: .seconds(30), "memory.reclaim") {
                failed.store(writeValue(file, "\(bytes)"), ordering: .releasing)
            }
            // EAGAIN: the kernel found no more to reclaim.
            guard finished, failed.load(ordering: .acquiring) == 0 else {
                log("gradual reclaim: memory.reclaim stopped (\(finished ? String(cString: strerror(failed.load(ordering: .acquiring))) : "timed out"))")
                return
            }
            try? await Task.sleep(for: .milliseconds(500))
            // User space at 2% or more (of all CPUs, over half a second) is someone working.
            let now = CPUTimes.read()
            let user = now.userPermille(since: previous)
            if user > max(policy.idlePermille, 20) {
                log("gradual reclaim: stopped, user space is busy (\(user)‰)")
                return
            }
            previous = now
        }
    }

    static let cgroupRoot = "/sys/fs/cgroup"

    /// cgroup2 at /sys/fs/cgroup of the VM's root (memory.reclaim lives there). Instances mount
    /// their own, from their own cgroup namespace (so their mount leaves these flags alone).
    /// favordynmods: every exec joins its instance's session cgroup, and moving a process
    /// between cgroups otherwise waits for an RCU grace period (cgroup_threadgroup_rwsem's
    /// write side), which under TCG is most of the agent's work before a spawn.
    static func mountCgroup() {
        if uvm_mount("cgroup2", cgroupRoot, "cgroup2", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), "favordynmods") != 0 {
            log("cannot mount cgroup2 at \(cgroupRoot): \(String(cString: strerror(errno)))")
        }
    }
}

/// Writes a value to a procfs/sysfs file: 0, or the errno of the open or write.
func writeValue(_ path: String, _ value: String) -> Int32 {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return errno }
    defer { close(fd) }
    let n = value.withCString { write(fd, $0, strlen($0)) }
    return n >= 0 ? 0 : errno
}

/// `writeValue`, with an error that names the file.
func writeSetting(_ path: String, _ value: String) throws {
    let err = writeValue(path, value)
    guard err == 0 else { throw WireError(.internalError, "\(path): \(String(cString: strerror(err)))") }
}

/// The first line of /proc/stat (all CPUs' time in clock ticks) and this agent's own share
/// (/proc/self/stat, the same ticks).
struct CPUTimes {
    var user: UInt64 = 0
    var system: UInt64 = 0
    var idle: UInt64 = 0
    var agent: UInt64 = 0

    static func read() -> CPUTimes {
        guard let text = readSmallFile("/proc/stat", limit: 4096),
              let line = text.split(separator: "\n").first, line.hasPrefix("cpu ") else { return CPUTimes() }
        let f = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        guard f.count >= 8 else { return CPUTimes() }
        // user nice system idle iowait irq softirq steal: iowait counts as busy (a guest waiting
        // on its disk is working, not idle).
        var t = CPUTimes(user: f[0] + f[1], system: f[2] + f[4] + f[5] + f[6] + f[7], idle: f[3])
        // utime and stime: the 12th and 13th fields after the command.
        if let g = procStatFields("/proc/self/stat"), g.count > 12, let u = UInt64(g[11]), let s = UInt64(g[12]) {
            t.agent = u + s
        }
        return t
    }

    var total: UInt64 { user + system + idle }

    /// Busy time of all CPUs since `earlier`, without this agent's, in thousandths.
    func busyPermille(since earlier: CPUTimes) -> Int {
        let t = total &- earlier.total
        guard t > 0, t < 1 << 40 else { return 0 }
        let busy = (user + system) &- (earlier.user + earlier.system)
        let own = agent &- earlier.agent
        return Int((busy > own && busy < 1 << 40 ? busy - own : 0) * 1000 / t)
    }

    /// User time since `earlier`, without this agent's (all of whose time counts: its user and
    /// system time are not told apart here), in thousandths.
    func userPermille(since earlier: CPUTimes) -> Int {
        let t = total &- earlier.total
        guard t > 0, t < 1 << 40 else { return 0 }
        let used = user &- earlier.user, own = agent &- earlier.agent
        return Int((used > own && used < 1 << 40 ? used - own : 0) * 1000 / t)
    }
}

/// Seconds since the guest booted: /proc/uptime's clock (CLOCK_BOOTTIME), at full resolution.
func guestUptime() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_BOOTTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// /proc/meminfo, in KiB by field name.
struct MemInfo {
    var fields: [Substring: UInt64] = [:]

    static func read() -> MemInfo {
        var m = MemInfo()
        for line in (readSmallFile("/proc/meminfo") ?? "").split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 2, let v = UInt64(f[1]) else { continue }
            m.fields[f[0].dropLast()] = v
        }
        return m
    }

    subscript(_ key: Substring) -> UInt64? { fields[key] }

    /// File-backed page cache (not tmpfs, which only swap can move) and reclaimable slab.
    var reclaimableKiB: UInt64 {
        (fields["Active(file)"] ?? 0) + (fields["Inactive(file)"] ?? 0) + (fields["SReclaimable"] ?? 0)
    }
}
