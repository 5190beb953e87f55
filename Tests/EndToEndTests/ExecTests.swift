import Foundation
import Testing

extension EndToEnd {
    /// What a user of `uvm exec` sees, on a real VM booted from our kernel (under TCG on machines
    /// whose KVM cannot run it). One VM serves the whole suite; tests run one after another because
    /// one of them stops the VM.
    @Suite struct ExecTests {
        @Test func runsOnOurKernelNotTheHosts() throws {
            let r = try Harness.run(["exec", "--", "uname", "-r"])
            #expect(r.status == 0, "stderr: \(r.err)")
            let guest = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
            // The kernel this checkout built (make test passes it), else the user's current one.
            let kernel = ProcessInfo.processInfo.environment["UVM_KERNEL"] ?? NSHomeDirectory() + "/.cache/uvm/kernel/current/bzImage"
            let built = try String(contentsOfFile: (kernel as NSString).deletingLastPathComponent + "/release", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            var u = utsname()
            uname(&u)
            let host = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            #expect(guest == built)
            #expect(guest != host)
            #expect(guest.hasSuffix("-uvm"))
            // Booted as the uncompressed vmlinux that kernel.sh keeps beside the bzImage, through
            // its PVH entry point.
            let vmlinux = (kernel as NSString).deletingLastPathComponent + "/vmlinux"
            #expect(FileManager.default.fileExists(atPath: vmlinux), "kernel.sh left no vmlinux beside \(kernel)")
            let qemu = try #require(try Harness.status(home: Harness.home)["qemuPID"] as? Int)
            let args = (FileManager.default.contents(atPath: "/proc/\(qemu)/cmdline") ?? Data()).split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            let image = args.firstIndex(of: "-kernel").map { args[$0 + 1] }
            #expect(image == vmlinux, "QEMU's command line: \(args)")
        }

        @Test func exitStatusIsTheCommands() throws {
            #expect(try Harness.run(["exec", "--", "sh", "-c", "exit 7"]).status == 7)
            #expect(try Harness.run(["exec", "--", "true"]).status == 0)
            #expect(try Harness.run(["exec", "--", "false"]).status == 1)
        }

        @Test func deathBySignalIs128PlusN() throws {
            #expect(try Harness.run(["exec", "--", "sh", "-c", "kill -TERM $$"]).status == 143)
            #expect(try Harness.run(["exec", "--", "sh", "-c", "kill -KILL $$"]).status == 137)
        }

        @Test func stdoutAndStderrStaySeparate() throws {
            let r = try Harness.run(["exec", "--", "sh", "-c", "echo to-out; echo to-err >&2; echo more-out"])
            #expect(r.status == 0)
            #expect(r.out == "to-out\nmore-out\n")
            #expect(r.err == "to-err\n")
        }

        /// The agent's descriptors (its link, sockets, other sessions' pipes) never reach a process:
        /// only its stdio is open (the spawn closes the rest with close_range).
        @Test func aProcessGetsOnlyItsStdio() throws {
            let r = try Harness.run(["exec", "--", "sh", "-c", "ls /proc/$$/fd | tr '\\n' ' '"])
            #expect(r.status == 0, "stderr: \(r.err)")
            #expect(r.out == "0 1 2 ")
        }

        @Test func optionsReachTheProcess() throws {
            let r = try Harness.run(["exec", "--cd", "/tmp", "--env", "GREETING=hello world", "-e", "X=1", "--",
                                     "sh", "-c", "pwd; echo \"$GREETING\" $X; id -u; hostname"])
            #expect(r.status == 0, "stderr: \(r.err)")
            #expect(r.out == "/tmp\nhello world 1\n0\nbusybox\n")
            let u = try Harness.run(["exec", "--user", "uvm", "--", "sh", "-c", "id -un; echo $HOME; pwd"])
            #expect(u.out == "uvm\n/home/uvm\n/home/uvm\n", "stderr: \(u.err)")
        }

        @Test func runsInItsOwnNamespacesOnTheDistroDisk() throws {
            // PID 1 of the instance is its init, not the agent; the root is the distro's ext4 disk.
            let r = try Harness.run(["exec", "--", "sh", "-c", "cat /etc/os-release | grep ^ID=; ls /proc/1/exe >/dev/null && echo pid1-visible; stat -f -c %T /"])
            #expect(r.status == 0, "stderr: \(r.err)")
            #expect(r.out.contains("ID=uvm-busybox"))
            #expect(r.out.contains("ext2/ext3"))
        }

        @Test func cgroupsFavourMovingProcesses() throws {
            // Each exec joins its instance's session cgroup; without favordynmods that move waits
            // for an RCU grace period (make bench: the agent's time before a spawn fell from
            // 24.9 ms to 7.6 ms with it). The flag is the hierarchy's, so the instance sees it.
            let r = try Harness.run(["exec", "--", "grep", "^cgroup2 ", "/proc/mounts"])
            #expect(r.status == 0 && r.out.contains("favordynmods"), "\(r.out) \(r.err)")
        }

        @Test func stdinIsBinarySafeAndEOFArrives() throws {
            let r = try Harness.shell("""
                head -c 50000000 /dev/urandom > "$UVM_HOME/x" && \
                uvm exec -- sha256sum < "$UVM_HOME/x" | cut -d' ' -f1 && sha256sum "$UVM_HOME/x" | cut -d' ' -f1; \
                rm -f "$UVM_HOME/x"
                """)
            #expect(r.status == 0, "stderr: \(r.err)")
            let lines = r.out.split(separator: "\n")
            #expect(lines.count == 2)
            #expect(lines.first == lines.last)
            #expect(lines.first?.count == 64)
        }

        @Test func largeOutputArrivesWhole() throws {
            let r = try Harness.shell("uvm exec -- head -c 50000000 /dev/zero | wc -c")
            #expect(r.status == 0, "stderr: \(r.err)")
            #expect(r.out.trimmingCharacters(in: .whitespaces) == "50000000\n")
        }

        @Test func aReaderThatFallsBehindStillGetsTheExitStatus() throws {
            // `uvm exec ... | less`: the reader starts late, the guest is held back by flow
            // control, and the exit status must still arrive after the output (the VM is up
            // first, so that the output is ready before the reader is). It used to end
            // with "the VM stopped unexpectedly" (exit 125) once all the output had been read.
            let r = try Harness.shell("""
                uvm exec -- true
                (uvm exec -- sh -c 'head -c 1000000 /dev/zero; exit 7'; echo "status $?" > "$UVM_HOME/st") | (sleep 2; wc -c)
                cat "$UVM_HOME/st"; rm -f "$UVM_HOME/st"
                """)
            #expect(r.out.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) } == ["1000000", "status 7"], "stderr: \(r.err)")
        }

        @Test func uvmTraceSaysWhereASessionsTimeWent() throws {
            // make bench's per-hop breakdown of a warm exec: one JSON line on stderr, each hop
            // there and plausible (a 0.2 s sleep is the process's time, not anyone else's).
            _ = try Harness.run(["exec", "--", "true"])
            let r = try Harness.run(["exec", "--", "sleep", "0.2"], env: ["UVM_TRACE": "1"])
            #expect(r.status == 0 && r.out.isEmpty, "stderr: \(r.err)")
            let line = try #require(r.err.split(separator: "\n").first { $0.hasPrefix("uvm-trace: ") }, "no trace in \(r.err)")
            let trace = try #require(try JSONSerialization.jsonObject(with: Data(line.dropFirst("uvm-trace: ".count).utf8)) as? [String: Double])
            for hop in ["cli.connect", "cli.session", "uvmd.beforeGuest", "uvmd.link", "guest.dispatch", "guest.beforeSpawn", "guest.process", "guest.afterExit"] {
                #expect((trace[hop] ?? -1) >= 0, "\(hop) missing in \(trace)")
            }
            #expect((trace["guest.process"] ?? 0) >= 0.2 && (trace["guest.beforeSpawn"] ?? 1) < 0.2, "\(trace)")
            #expect((trace["cli.session"] ?? 0) >= (trace["guest.process"] ?? 1), "\(trace)")
            // Only when asked.
            #expect(try !Harness.run(["exec", "--", "true"]).err.contains("uvm-trace"))
        }

        @Test func twentyConcurrentExecsGetTheirOwnOutputAndStatus() throws {
            let results = Mutex20()
            DispatchQueue.concurrentPerform(iterations: 20) { i in
                let r = try? Harness.run(["exec", "--", "sh", "-c", "echo session-\(i); echo err-\(i) >&2; exit \(i + 10)"])
                results.set(i, r)
            }
            for i in 0..<20 {
                let r = try #require(results.get(i))
                #expect(r.out == "session-\(i)\n")
                #expect(r.err == "err-\(i)\n")
                #expect(r.status == Int32(i + 10))
            }
        }

        @Test func sigintToUvmEndsTheGuestProcess() throws {
            let p = try Harness.start(["exec", "--", "sleep", "4242"])
            // Wait until the guest process runs.
            let running = try Harness.waitUntil(timeout: 60) {
                try Harness.run(["exec", "--", "sh", "-c", "ps | grep -v grep | grep -q 'sleep 4242'"]).status == 0
            }
            #expect(running)
            kill(p.processIdentifier, SIGINT)
            p.waitUntilExit()
            #expect(p.terminationStatus == 130)
            let gone = try Harness.waitUntil(timeout: 60) {
                try Harness.run(["exec", "--", "sh", "-c", "ps | grep -v grep | grep -q 'sleep 4242'"]).status != 0
            }
            #expect(gone)
        }

        /// `yes | uvm exec -- sleep N`: stdin backed up all the way (the process never reads it).
        /// Returns the client, its feeder, once the guest process runs and stdin no longer moves.
        func startWithBusyStdin(_ marker: String) throws -> (Harness.Spawned, StdinFeeder) {
            let p = try Harness.spawnUVM(["exec", "--", "sleep", marker], home: Harness.home, env: [:], keepInput: true)
            let feeder = StdinFeeder(fd: dup(p.input))
            p.closeInput()
            let running = try Harness.waitUntil(timeout: 120) { try guestRuns("sleep \(marker)") }
            #expect(running, "stderr: \(p.stderr)")
            var last = -1
            let saturated = Harness.waitUntil(timeout: 60) {
                defer { last = feeder.written }
                return feeder.written == last && last > 0
            }
            #expect(saturated, "stdin still moving: \(feeder.written) bytes")
            return (p, feeder)
        }

        func guestRuns(_ command: String) throws -> Bool {
            try Harness.spawnRun(["exec", "--", "sh", "-c", "ps | grep -v grep | grep -q '\(command)'"], home: Harness.home, timeout: 120).status == 0
        }

        /// Ctrl-C used to wait behind stdin: on the host the signal thread waited for the stdin
        /// thread's lock, in the guest signals were read only after the pending stdin was written.
        @Test func sigintReachesACommandWhoseStdinIsBusy() throws {
            let (p, feeder) = try startWithBusyStdin("611")
            let start = Date()
            kill(p.pid, SIGINT)
            // 1 s would do on a quiet machine; this one is shared.
            while p.isRunning && Date().timeIntervalSince(start) < 10 { usleep(5_000) }
            let ended = !p.isRunning
            let took = Date().timeIntervalSince(start)
            if !ended { kill(p.pid, SIGKILL) }
            let status = p.wait()
            print("SIGINT with \(feeder.written) bytes of stdin sent: uvm exited after \(Int(took * 1000)) ms")
            #expect(ended, "uvm still running 10 s after SIGINT")
            #expect(status == 130, "stderr: \(p.stderr)")
            #expect(try Harness.waitUntil(timeout: 60) { try !guestRuns("sleep 611") })
        }

        /// A client killed outright (its connection just goes) ends its session in the guest too,
        /// however much of its stdin is still on the way.
        @Test func killedClientWithBusyStdinEndsTheGuestProcess() throws {
            let (p, _) = try startWithBusyStdin("612")
            let start = Date()
            kill(p.pid, SIGKILL)
            p.wait()
            let gone = try Harness.waitUntil(timeout: 60) { try !guestRuns("sleep 612") }
            print("kill -9 of uvm with busy stdin: guest process gone after \(Int(Date().timeIntervalSince(start) * 1000)) ms")
            #expect(gone, "sleep 612 still runs in the guest 60 s after its client was killed")
        }

        @Test func statusDescribesTheVM() throws {
            _ = try Harness.run(["exec", "--", "true"])
            let r = try Harness.run(["status", "--format", "json"])
            #expect(r.status == 0)
            let json = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
            #expect(json["state"] as? String == "Running")
            #expect(["tcg", "kvm"].contains(json["accelerator"] as? String ?? ""))
            #expect((json["kernelRelease"] as? String)?.hasSuffix("-uvm") == true)
            #expect((json["uptimeSeconds"] as? Double ?? 0) > 0)
            let qemu = try #require(json["qemuPID"] as? Int)
            #expect(kill(pid_t(qemu), 0) == 0)
            #expect((json["memoryMiB"] as? Int ?? 0) > 0)
            // What the VM holds: QEMU's resident memory as /proc says it, the guest's own view,
            // and each distro's disk as the host's file system sees it.
            let rss = try #require(json["qemuRSSKiB"] as? Int, "no qemuRSSKiB in \(r.out)")
            let proc = (try? String(contentsOfFile: "/proc/\(qemu)/status", encoding: .utf8))?
                .split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
                .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? -1
            #expect(rss > 10_000 && abs(rss - proc) < proc / 2, "qemuRSSKiB \(rss), /proc says \(proc)")
            let total = try #require(json["guestMemTotalKiB"] as? Int)
            #expect((json["guestMemCachedKiB"] as? Int ?? -1) >= 0 && (json["guestMemCachedKiB"] as? Int ?? 0) < total)
            #expect(json["guestSwapTotalKiB"] as? Int != nil && json["guestSwapUsedKiB"] as? Int != nil)
            let disks = try #require(json["disks"] as? [[String: Any]], "no disks in \(r.out)")
            let busybox = try #require(disks.first { $0["name"] as? String == "busybox" })
            var st = stat()
            #expect(stat("\(Harness.home)/data/distros/busybox/disk.ext4", &st) == 0)
            #expect(busybox["allocatedBytes"] as? Int == Int(st.st_blocks) * 512 || abs((busybox["allocatedBytes"] as? Int ?? 0) - Int(st.st_blocks) * 512) < 16 << 20)
            #expect(busybox["sizeBytes"] as? Int == Int(st.st_size))
            // Where the boot went (`make bench` reports it): every phase there and not negative,
            // and together they are the boot's total.
            let boot = try #require(json["boot"] as? [String: Double], "no boot phases in \(r.out)")
            let parts = ["prepare", "libvirt", "firmware", "kernel", "agent", "setup"].map { boot[$0] ?? -1 }
            #expect(parts.allSatisfy { $0 >= 0 }, "\(boot)")
            #expect(abs(parts.reduce(0, +) - (boot["total"] ?? 0)) < 0.05, "\(boot)")
            // qboot where QEMU ships it (Debian's qemu-system-data does), and QEMU was told so.
            let qboot = "/usr/share/qemu/qboot.rom"
            if access(qboot, R_OK) == 0 {
                #expect(json["firmware"] as? String == qboot)
                let cmdline = (try? String(contentsOfFile: "/proc/\(qemu)/cmdline", encoding: .utf8)) ?? ""
                #expect(cmdline.contains("-bios\0\(qboot)"), "QEMU's command line: \(cmdline)")
            } else {
                #expect(json["firmware"] as? String == "seabios")
            }
            let text = try Harness.run(["status"])
            #expect(text.out.contains("state:   Running"))
            #expect(text.out.contains("QEMU holds") && text.out.contains("disk:") && text.out.contains("busybox:"), "\(text.out)")
        }

        @Test func daemonSocketIsOnlyForItsUser() throws {
            _ = try Harness.run(["exec", "--", "true"])
            var st = stat()
            #expect(stat("\(Harness.home)/state/uvmd.sock", &st) == 0)
            #expect(st.st_mode & 0o777 == 0o600)
            #expect(st.st_uid == geteuid())
        }

        @Test func execBootsAStoppedVM() throws {
            let stop = try Harness.run(["stop"])
            #expect(stop.status == 0, "stderr: \(stop.err)")
            let stopped = try Harness.run(["status", "--format", "json"])
            #expect(stopped.out.contains("\"state\" : \"Stopped\""))
            let r = try Harness.run(["exec", "--", "true"])
            #expect(r.status == 0, "stderr: \(r.err)")
            #expect(try Harness.run(["status"]).out.contains("Running"))
        }
    }
}

/// Results of the concurrent test, one slot per session.
final class Mutex20: @unchecked Sendable {
    private let lock = NSLock()
    private var slots = [Harness.Result?](repeating: nil, count: 20)
    func set(_ i: Int, _ r: Harness.Result?) { lock.lock(); slots[i] = r; lock.unlock() }
    func get(_ i: Int) -> Harness.Result? { lock.lock(); defer { lock.unlock() }; return slots[i] }
}

/// Writes "y\n" to `fd` from a thread of its own until the reader is gone, as `yes |` does.
final class StdinFeeder: @unchecked Sendable {
    private let lock = NSLock()
    private var total = 0
    var written: Int { lock.lock(); defer { lock.unlock() }; return total }

    init(fd: Int32) {
        signal(SIGPIPE, SIG_IGN)
        Thread.detachNewThread { [self] in
            let chunk = [UInt8](repeating: 0, count: 64 << 10).enumerated().map { $0.offset % 2 == 0 ? UInt8(ascii: "y") : UInt8(ascii: "\n") }
            while true {
                let n = chunk.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                lock.lock(); total += n; lock.unlock()
            }
            close(fd)
        }
    }
}
