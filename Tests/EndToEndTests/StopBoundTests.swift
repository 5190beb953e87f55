import Foundation
import Testing

extension EndToEnd {
    /// A stop always ends, and a uvmd on its way out hands new commands to the next one.
    @Suite struct StopBoundTests {
        static let config = "[vm]\nvmIdleTimeout = never\n[general]\ninstanceIdleTimeout = never\n"

        /// The libvirt daemon this user's uvmd talks to: the per-user one (qemu:///session) for an
        /// ordinary account, the system one for root.
        static func libvirtd() -> [pid_t] {
            let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }
            return pids.filter { pid in
                var st = stat()
                guard stat("/proc/\(pid)", &st) == 0, st.st_uid == getuid(),
                      let comm = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8) else { return false }
                return comm.trimmingCharacters(in: .whitespacesAndNewlines) == "libvirtd"
            }
        }

        /// libvirtd frozen (SIGSTOP): no lifecycle event, no answer to destroy. `uvm stop` used to
        /// wait for the event for good; now it ends within its bound and says what it did, and the
        /// next command gets a VM again once libvirtd answers.
        @Test func stopEndsWithinItsBoundWhenLibvirtIsStuck() throws {
            try Harness.withConfiguredHome("stuck-libvirt", config: Self.config) { home, env in
                let first = try Harness.spawnRun(["exec", "--", "true"], home: home, env: env)
                try #require(first.status == 0, "stderr: \(first.err)\n\(Harness.daemonLog(home))")
                let daemons = Self.libvirtd()
                try #require(!daemons.isEmpty, "no libvirtd of uid \(getuid()) found")
                daemons.forEach { kill($0, SIGSTOP) }
                var resumed = false
                defer { if !resumed { daemons.forEach { kill($0, SIGCONT) } } }
                let started = Date()
                let stop = try Harness.spawnRun(["stop"], home: home, env: env, timeout: 120)
                let took = Date().timeIntervalSince(started)
                // Bound: 20 s for the guest's power-off, 15 s for libvirt's event, 10 s for destroy.
                #expect(stop.status == 0 && took < 90, "uvm stop: status \(stop.status) after \(took) s: \(stop.err)\n\(Harness.daemonLog(home))")
                let log = (try? String(contentsOfFile: "\(home)/state/uvmd.log", encoding: .utf8)) ?? ""
                #expect(log.contains("VM stopped"), "\(Harness.daemonLog(home))")
                let status = try Harness.status(home: home)
                #expect(status["state"] as? String == "Stopped")
                // It says how the stop ended: the guest powered off, but libvirt never said so, so
                // either the 15 s wait ran out ("destroyed: ...") or libvirt's keepalive gave up on
                // the connection first (then the VM counts as stopped: "powered off cleanly").
                #expect(stop.out.contains("stopped: "), "\(stop.out)")
                #expect(status["lastStop"] as? String != nil, "\(status)")
                daemons.forEach { kill($0, SIGCONT) }
                resumed = true
                let again = try Harness.spawnRun(["exec", "--", "echo", "again"], home: home, env: env, timeout: 300)
                #expect(again.status == 0 && again.out == "again\n", "stderr: \(again.err)\n\(Harness.daemonLog(home))")
            }
        }

        /// SIGTERM to uvmd (a service restart, an upgrade), then a command a second later: the
        /// exiting uvmd no longer accepts it, the command launches the next uvmd and waits for the
        /// old one to go, and runs there. It used to be accepted, boot a VM, be cancelled on the
        /// way out ("uvmd closed the connection before the command finished") and leave that VM
        /// behind for the next uvmd to adopt.
        @Test func aCommandSentWhileUvmdExitsRunsInTheNextUvmd() throws {
            try Harness.withConfiguredHome("restart", config: Self.config) { home, env in
                let first = try Harness.spawnRun(["exec", "--", "true"], home: home, env: env)
                try #require(first.status == 0, "stderr: \(first.err)")
                let before = try Harness.status(home: home)
                let uvmd = try #require(before["daemonPID"] as? Int)
                let domain = try #require(before["domain"] as? String)
                kill(pid_t(uvmd), SIGTERM)
                usleep(1_000_000)
                let next = try Harness.spawnRun(["exec", "--", "echo", "served"], home: home, env: env, timeout: 300)
                #expect(next.status == 0 && next.out == "served\n", "status \(next.status): \(next.err)\n\(Harness.daemonLog(home))")
                #expect(!Harness.alive(uvmd), "the old uvmd is still running")
                let after = try Harness.status(home: home)
                #expect(after["daemonPID"] as? Int != uvmd)
                let log = (try? String(contentsOfFile: "\(home)/state/uvmd.log", encoding: .utf8)) ?? ""
                #expect(!log.contains("found a VM left behind"), "the exiting uvmd left its VM behind\n\(Harness.daemonLog(home))")
                #expect(Harness.qemuProcesses(domain: domain).count == 1)
            }
        }
    }
}
