import Foundation
import Testing

extension EndToEnd {
    /// Interop: `uvm-host` in a session runs a host program as the session's user, with its stdio,
    /// exit status, signals and (inside a share) its folder; off by default, refused to processes
    /// that left their session, and refusable by a distro.
    @Suite struct InteropTests {
        static let tag = "uvm-e2e-interop-\(getpid())"

        @Test func offByDefaultItSaysHowToTurnItOn() throws {
            let r = try Harness.run(["exec", "--", "uvm-host", "true"])
            #expect(r.status == 1)
            #expect(r.err.contains("interop is off") && r.err.contains("[interop]") && r.err.contains("enabled = true"), "\(r.err)")
            let env = try Harness.run(["exec", "--", "sh", "-c", "echo ${UVM_INTEROP:-none}; command -v xdg-open || echo not-ours"])
            #expect(env.out == "none\nnot-ours\n", "xdg-open is only redirected while interop is on: \(env.out)")
        }

        @Test func onItRunsHostProgramsForTheSessionOnly() throws {
            let home = "/tmp/\(Self.tag)-home"
            let share = "/tmp/\(Self.tag)-share", tools = "/tmp/\(Self.tag)-tools"
            defer {
                Harness.stopDaemon(home: home)
                for d in [home, share, tools] { try? FileManager.default.removeItem(atPath: d) }
            }
            try FileManager.default.createDirectory(atPath: share + "/sub", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: tools, withIntermediateDirectories: true)
            // A stand-in for the host's xdg-open, first on the session's host PATH.
            try "#!/bin/sh\necho \"host xdg-open: $*\" > \(tools)/opened\n".write(toFile: tools + "/xdg-open", atomically: false, encoding: .utf8)
            chmod(tools + "/xdg-open", 0o755)
            let hostPath = "\(tools):" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")
            let env = ["UVM_INTEROP_ENABLED": "1", "UVM_TEST_MARK": "from-the-host", "PATH": hostPath]
            func uvm(_ args: [String], stdin: Data? = nil) throws -> Harness.Result {
                try Harness.run(args, stdin: stdin, home: home, env: env)
            }
            #expect(try uvm(["share", "add", "interop", share]).status == 0)

            // Inside a share: the matching host folder, the host user, the exit status.
            let r = try uvm(["exec", "--cd", "/mnt/host/interop/sub", "--", "uvm-host", "--", "sh", "-c", "pwd; id -u; exit 4"])
            #expect(r.status == 4, "\(r.err)")
            let canonical = URL(fileURLWithPath: share + "/sub").resolvingSymlinksInPath().path
            #expect(r.out == "\(canonical)\n\(getuid())\n", "\(r.err)")
            // Stdin and stdout cross both ways; the host program has the caller's environment,
            // which the guest never sees.
            let tr = try uvm(["exec", "--", "uvm-host", "--", "sh", "-c", "tr a-z A-Z; echo $UVM_TEST_MARK"], stdin: Data("hello\n".utf8))
            #expect(tr.status == 0 && tr.out == "HELLO\nfrom-the-host\n", "\(tr.out) \(tr.err)")
            #expect(try uvm(["exec", "--", "sh", "-c", "echo ${UVM_TEST_MARK:-unset}"]).out == "unset\n")
            // Stderr too, and a program the host does not have is 127.
            let missing = try uvm(["exec", "--", "uvm-host", "--", "no-such-program-\(Self.tag)"])
            #expect(missing.status == 127 && missing.err.contains("no-such-program"), "\(missing.err)")

            // xdg-open in the guest is the host's.
            let open = try uvm(["exec", "--", "sh", "-c", "command -v xdg-open; xdg-open https://example.invalid/x"])
            #expect(open.status == 0 && open.out == "/run/uvm/interop/xdg-open\n", "\(open.out) \(open.err)")
            #expect((try? String(contentsOfFile: tools + "/opened", encoding: .utf8)) == "host xdg-open: https://example.invalid/x\n")

            // A process that left its session (double fork: the instance's init adopts it) is refused.
            let orphan = try uvm(["exec", "--", "sh", "-c",
                                  "(setsid sh -c 'sleep 1; uvm-host true; echo rc=$?' > /tmp/\(Self.tag) 2>&1 &); sleep 5; cat /tmp/\(Self.tag)"])
            #expect(orphan.out.contains("refused") && orphan.out.contains("rc=126"), "\(orphan.out) \(orphan.err)")

            // A signal to uvm reaches the host program through the guest; it leaves nothing behind.
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Harness.uvm)
            p.arguments = ["exec", "--", "uvm-host", "--", "sleep", "317"]
            p.environment = Harness.environment(home: home, extra: env)
            try p.run()
            #expect(Harness.waitUntil(timeout: 60) { Self.hostSleeps() })
            kill(p.processIdentifier, SIGINT)
            #expect(Harness.waitUntil(timeout: 30) { !p.isRunning })
            if p.isRunning { p.terminate() }
            p.waitUntilExit()
            #expect(p.terminationStatus == 130)
            #expect(Harness.waitUntil(timeout: 10) { !Self.hostSleeps() }, "the host's sleep 317 was left running")

            // A distro can refuse interop in its /etc/uvm.conf (it cannot turn it on: that is the host's).
            #expect(try uvm(["exec", "--user", "root", "--", "sh", "-c", "printf '[interop]\\nenabled = false\\n' > /etc/uvm.conf"]).status == 0)
            #expect(try uvm(["terminate", "busybox"]).status == 0)
            let refused = try uvm(["exec", "--", "uvm-host", "true"])
            #expect(refused.status == 1 && refused.err.contains("interop is off"), "\(refused.err)")
        }

        static func hostSleeps() -> Bool {
            let r = try? Harness.runProcess("/usr/bin/pgrep", ["-f", "-x", "sleep 317"], stdin: nil, env: ProcessInfo.processInfo.environment)
            return r?.status == 0
        }
    }
}
