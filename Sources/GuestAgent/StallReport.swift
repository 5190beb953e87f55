import Glibc
import NIOCore
import NIOPosix
import Synchronization

/// Says on the console what the agent's threads are doing when it stops making progress. uvmd
/// kills a VM whose agent has not answered for 120 s and keeps its console (console.log.failed):
/// without this, that log ends with the last thing the agent said and nothing about why it went
/// quiet. Heartbeats are watched from a plain thread: one from a task on Swift's cooperative pool
/// (two threads here; a blocking call on each starves every actor and session), one from each
/// event loop, and one per probe (the instances' actor, which uvmd's liveness check asks); when one
/// has been silent for `silence`, each thread's state, system call and kernel stack are logged,
/// with every process in the VM that is in uninterruptible sleep, once per stall.
enum StallReport {
    static let silence: Duration = .seconds(20)
    /// Beats by source: "Swift's cooperative pool", "event loop 0", ...
    private static let beats = Mutex<[String: Int]>([:])

    private static func beat(_ source: String) {
        beats.withLock { $0[source, default: 0] += 1 }
    }

    /// `probes`: more things that must keep answering, by name (an actor that a blocking call
    /// inside it would hold: every session that needs it waits, and uvmd's liveness check too).
    static func start(probes: [(String, @Sendable () async -> Void)] = []) {
        for (name, probe) in [("Swift's cooperative pool", { @Sendable () async in })] + probes {
            Task.detached {
                while true {
                    await probe()
                    beat(name)
                    try? await Task.sleep(for: .seconds(1))
                }
            }
        }
        for (i, loop) in MultiThreadedEventLoopGroup.singleton.makeIterator().enumerated() {
            loop.scheduleRepeatedTask(initialDelay: .zero, delay: .seconds(1)) { _ in beat("event loop \(i)") }
        }
        startThread {
            var last: [String: Int] = [:]
            var since: [String: ContinuousClock.Instant] = [:]
            var reported = false
            while true {
                sleep(1)
                let now = beats.withLock { $0 }
                for (source, n) in now where last[source] != n { since[source] = .now }
                last = now
                let stalled = since.filter { ContinuousClock.now - $0.value >= silence }.keys.sorted()
                if stalled.isEmpty {
                    reported = false
                } else if !reported {
                    reported = true
                    log("stalled: \(stalled.joined(separator: " and ")) made no progress for \(silence)")
                    for line in describe() { log("stalled: \(line)") }
                }
            }
        }
    }

    /// The agent's threads, then every other process in uninterruptible sleep (D).
    static func describe() -> [String] {
        var out: [String] = []
        for tid in numbers(in: "/proc/self/task") {
            out += thread("/proc/self/task/\(tid)", label: "thread \(tid)")
        }
        let me = getpid()
        for pid in numbers(in: "/proc") where pid != me {
            guard state("/proc/\(pid)") == "D" else { continue }
            out += thread("/proc/\(pid)", label: "process \(pid)")
        }
        return out
    }

    private static func thread(_ dir: String, label: String) -> [String] {
        let comm = readSmallFile("\(dir)/comm", limit: 64)?.trimmed ?? "?"
        let syscall = readSmallFile("\(dir)/syscall", limit: 256)?.trimmed ?? "?"
        var lines = ["\(label) \(comm) state \(state(dir)) syscall \(syscall)"]
        let stack = (readSmallFile("\(dir)/stack", limit: 8192) ?? "").split(separator: "\n")
        lines += stack.prefix(24).map { "  \($0)" }
        return lines
    }

    private static func state(_ dir: String) -> String {
        procStatFields("\(dir)/stat")?.first.map(String.init) ?? "?"
    }

    private static func numbers(in dir: String) -> [Int32] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var out: [Int32] = []
        while let e = readdir(d) {
            if let n = Int32(direntName(e)) { out.append(n) }
        }
        return out.sorted()
    }
}
