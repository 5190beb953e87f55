import Foundation
import Testing

extension EndToEnd {
    /// The idle reaper on a real VM: each test has its own uvmd and VM, configured through uvm.conf.
    @Suite struct IdleReaperTests {
        static let config = """
            [vm]
            vmIdleTimeout = 2s
            [general]
            instanceIdleTimeout = 1s
            """

        @Test func theVMGoesAwayAfterTheLastExec() throws {
            try Harness.withConfiguredHome("reap", config: Self.config) { home, env in
                let r = try Harness.spawnRun(["exec", "--", "true"], home: home, env: env)
                #expect(r.status == 0, "stderr: \(r.err)")
                let st = try Harness.status(home: home)
                let qemu = try #require(st["qemuPID"] as? Int)
                #expect(st["vmIdleTimeout"] as? String == "2s")
                #expect(st["instanceIdleTimeout"] as? String == "1s")
                // Bounded only so that a broken reaper fails the test; `make bench` says how fast.
                #expect(Harness.waitUntil(timeout: 60) { !Harness.alive(qemu) }, "\(Harness.daemonLog(home))")
                // uvmd learns it from libvirt's event, a moment after the process is gone.
                #expect(try Harness.waitUntil(timeout: 30) { try Harness.status(home: home)["state"] as? String == "Stopped" })
                let list = try Harness.list(home: home)
                #expect(list.vm["state"] as? String == "Stopped")
                #expect(list.instances.first { $0["name"] as? String == "busybox" }?["state"] as? String == "Stopped")
                // The next command boots it again.
                #expect(try Harness.spawnRun(["exec", "--", "echo", "again"], home: home, env: env).out == "again\n")
            }
        }

        /// A command that comes while the reaper is powering the VM off is not lost with it: it
        /// waits for the stop and runs in a fresh VM.
        @Test func aCommandDuringTheReapersStopRunsInAFreshVM() throws {
            try Harness.withConfiguredHome("midstop", config: Self.config) { home, env in
                #expect(try Harness.spawnRun(["exec", "--", "true"], home: home, env: env).status == 0)
                // The clean power-off takes seconds under TCG: status sees it.
                let stopping = try Harness.waitUntil(timeout: 60) {
                    try Harness.status(home: home)["state"] as? String == "Stopping"
                }
                try #require(stopping, "never saw the reaper's stop; \(Harness.daemonLog(home))")
                let r = try Harness.spawnRun(["exec", "--", "echo", "after"], home: home, env: env)
                #expect(r.status == 0 && r.out == "after\n", "status \(r.status), stderr: \(r.err)\n\(Harness.daemonLog(home))")
                // ... in a second boot, not in the VM that was going away.
                let log = (try? String(contentsOfFile: "\(home)/state/uvmd.log", encoding: .utf8)) ?? ""
                #expect(log.components(separatedBy: "guest up").count - 1 == 2, "\(Harness.daemonLog(home))")
            }
        }

        @Test func anOpenIdleShellKeepsTheVMUp() throws {
            try Harness.withConfiguredHome("shell", config: Self.config) { home, env in
                let shell = try Harness.spawnUVM([], home: home, env: env, keepInput: true)
                defer { if shell.isRunning { kill(shell.pid, SIGKILL); shell.wait() } }
                let connected = try Harness.waitUntil(timeout: 120) {
                    try Harness.list(home: home).instances.first { $0["name"] as? String == "busybox" }?["clients"] as? Int == 1
                }
                #expect(connected, "\(Harness.daemonLog(home))")
                let qemu = try #require(try Harness.status(home: home)["qemuPID"] as? Int)
                // Three times both timeouts, idle: the shell is a client, so nothing stops.
                sleep(9)
                #expect(Harness.alive(qemu), "\(Harness.daemonLog(home))")
                let list = try Harness.list(home: home)
                #expect(list.vm["state"] as? String == "Running")
                #expect(list.vm["idleStopInSeconds"] == nil)
                let busybox = try #require(list.instances.first { $0["name"] as? String == "busybox" })
                #expect(busybox["state"] as? String == "Running")
                #expect(busybox["clients"] as? Int == 1)
                #expect(busybox["idleStopInSeconds"] == nil)
                // The shell leaves: now the reaper takes the VM.
                shell.write("exit 5\n")
                shell.closeInput()
                #expect(shell.wait() == 5, "stderr: \(shell.stderr)")
                #expect(Harness.waitUntil(timeout: 60) { !Harness.alive(qemu) }, "\(Harness.daemonLog(home))")
            }
        }

        /// Write, let the reaper stop the VM, boot again: nothing is lost and the file system is
        /// clean every time (the instance's teardown syncs and unmounts, the agent powers off).
        @Test func twentyReaperCyclesLoseNothing() throws {
            let config = "[vm]\nvmIdleTimeout = 500ms\n[general]\ninstanceIdleTimeout = 200ms\n"
            try Harness.withConfiguredHome("cycles", config: config) { home, env in
                let disk = "\(home)/data/distros/busybox/disk.ext4"
                var expected = ""
                for i in 1...20 {
                    expected += "cycle-\(i) "
                    let r = try Harness.spawnRun(["exec", "--", "sh", "-c",
                        "echo cycle-\(i) > /root/cycle-\(i) && head -c 100000 /dev/urandom > /root/blob && md5sum /root/blob > /root/blob.md5 && "
                        + "ls /root | grep -c ^cycle- >/dev/null && cat $(ls /root/cycle-* | sort -t- -k2 -n) | tr '\\n' ' '"],
                        home: home, env: env)
                    #expect(r.status == 0, "cycle \(i): \(r.err)\n\(Harness.daemonLog(home))")
                    #expect(r.out == expected, "cycle \(i)")
                    // Every later cycle would miss this one's file too: one failure, said once.
                    if r.status != 0 || r.out != expected { break }
                    if i > 1 {
                        // The previous cycle's blob and its checksum survived the power-off.
                        let check = try Harness.spawnRun(["exec", "--", "md5sum", "-c", "/root/blob.md5"], home: home, env: env)
                        #expect(check.status == 0, "cycle \(i): \(check.out) \(check.err)\n\(Harness.daemonLog(home))")
                    }
                    let stopped = try Harness.waitUntil(timeout: 60) {
                        try Harness.status(home: home)["state"] as? String == "Stopped"
                    }
                    #expect(stopped, "cycle \(i): the reaper did not stop the VM; \(Harness.daemonLog(home))")
                    let fsck = try Harness.spawn("/sbin/fsck.ext4", ["-n", "-f", disk], env: [:])
                    let fsckStatus = fsck.wait()
                    #expect(fsckStatus == 0, "cycle \(i): fsck: \(String(decoding: fsck.stdout, as: UTF8.self)) \(fsck.stderr)")
                    if !stopped || fsckStatus != 0 { break }
                }
            }
        }
    }
}
