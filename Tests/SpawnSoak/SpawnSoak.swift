// Drives uvm-init's spawn path (spawnProcess + ChildReaper) COUNT times in a process of its own:
// the reaper reaps with waitpid(-1), which would steal the children of anything sharing its
// process, such as the other tests. GuestAgentTests runs it and reads its last line.
//
//   spawn-soak COUNT   ->  "spawns=N rssAfterWarmupKiB=A rssEndKiB=B waiters=W unclaimed=U ignored=I"
//
// One child lives throughout (as an instance's init does), so the reaper never sees ECHILD.
// No spawn for 20 s is a stall: it says so and exits 2 rather than hang.
import GuestAgent
import Glibc
import Synchronization

@main enum SpawnSoak {
    static let progress = Atomic<Int>(0)

    static func main() async throws {
        let count = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 70_000 : 70_000
        startWatchdog()
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        let me = Account(name: "root", uid: getuid(), gid: getgid(), home: "/", shell: "/bin/sh", groups: [getgid()])
        @Sendable func start(_ argv: [String]) throws -> pid_t {
            try spawnProcess(argv: argv, env: ["PATH": "/usr/bin:/bin"], cwd: "/", fallbackCwd: nil, account: me,
                             stdio: (null, null, null), tty: false, instancePID: 0)
        }

        let longLived = try start(["sleep", "1000"])
        let lanes = 8  // spawns in flight at once: the waits overlap, the wake-up writes add up all the same
        var rssAfterWarmup = 0
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 1...count {
                if i > lanes { try await group.next() }
                group.addTask {
                    if i % 100 == 0 {
                        // A command that does not exist: its pre-exec child must not be remembered for ever.
                        do {
                            _ = try start(["uvm-no-such-command"])
                            print("a missing command started")
                            exit(1)
                        } catch is ExecFailure {}
                    } else {
                        let pid = try start(["/bin/busybox", "true"])
                        let status = await ChildReaper.shared.wait(for: pid)
                        guard status == 0 else { print("spawn \(i): status \(status)"); exit(1) }
                    }
                    progress.add(1, ordering: .relaxed)
                }
                if i == min(5_000, count) { rssAfterWarmup = vmRSSKiB() }
            }
            try await group.waitForAll()
        }
        kill(longLived, SIGKILL)
        _ = await ChildReaper.shared.wait(for: longLived)
        // The failed spawns' children may still be on their way to the reaper.
        for _ in 0..<100 where ChildReaper.shared.bookkeeping != (0, 0, 0) { try await Task.sleep(for: .milliseconds(10)) }
        let b = ChildReaper.shared.bookkeeping
        print("spawns=\(count) rssAfterWarmupKiB=\(rssAfterWarmup) rssEndKiB=\(vmRSSKiB()) waiters=\(b.waiters) unclaimed=\(b.unclaimed) ignored=\(b.ignored)")
    }

    /// A plain thread: a stalled spawn blocks a thread of the cooperative pool.
    static func startWatchdog() {
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var last = -1
            while true {
                sleep(20)
                let now = SpawnSoak.progress.load(ordering: .relaxed)
                if now == last {
                    print("stalled after \(now) spawns")
                    exit(2)
                }
                last = now
            }
        }, nil)
    }

    static func vmRSSKiB() -> Int {
        let fd = open("/proc/self/status", O_RDONLY)
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 8192)
        let n = read(fd, &buf, buf.count)
        let text = String(decoding: buf[0..<max(n, 0)], as: UTF8.self)
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return -1 }
        return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? -1
    }
}
