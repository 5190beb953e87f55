import Foundation
import Testing

extension EndToEnd {
    /// `uvm` alone: a login shell on a real pty in the guest, driven through tmux like a person.
    @Suite struct ShellTests {
        /// tmux through posix_spawn and waitpid: the tmux client forks the server, which
        /// Foundation's Process does not cope with (the client was never reaped).
        func tmux(_ socket: String, _ args: String...) throws -> String {
            try? FileManager.default.createDirectory(atPath: Harness.home, withIntermediateDirectories: true)
            let out = "\(Harness.home)/tmux-\(getpid()).out"
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
            let argv = (["tmux", "-L", socket] + args).map { strdup($0) } + [nil]
            defer { argv.forEach { free($0) } }
            let env = Harness.environment().map { strdup("\($0.key)=\($0.value)") } + [nil]
            defer { env.forEach { free($0) } }
            var pid: pid_t = 0
            guard posix_spawn(&pid, "/usr/bin/tmux", &actions, nil, argv, env) == 0 else { return "" }
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            return (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        }

        func screen(_ socket: String) throws -> String { try tmux(socket, "capture-pane", "-t", "t", "-p") }

        /// Waits until `command` runs in the guest: a key sent before it starts would reach the
        /// shell instead (on a loaded machine that can take longer than any fixed pause).
        func waitForGuestProcess(_ command: String) throws {
            let running = try Harness.waitUntil(timeout: 60) {
                try Harness.run(["exec", "--", "sh", "-c", "ps | grep -v grep | grep -q '\(command)'"]).status == 0
            }
            #expect(running, "\(command) never ran in the guest")
        }

        /// Waits for `text` on the screen; when it never comes, the screen goes into the test's
        /// record so a failure says what the terminal showed instead.
        func waitFor(_ socket: String, _ text: String) throws -> Bool {
            if try Harness.waitUntil(timeout: 60, { try screen(socket).contains(text) }) { return true }
            Issue.record("waited 60 s for \(text.debugDescription); the screen shows:\n\(try screen(socket))")
            return false
        }

        @Test func interactiveShellBehavesLikeALocalTerminal() throws {
            let socket = "uvm-test-\(getpid())"
            defer { _ = try? tmux(socket, "kill-server") }
            _ = try tmux(socket, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", "sh")
            _ = try tmux(socket, "send-keys", "-t", "t", "\(Harness.uvm); echo EXITED=$?; stty -a | grep -q ' icanon' && echo canonical=$((1+1))", "Enter")
            _ = try tmux(socket, "send-keys", "-t", "t", "echo $((6*7)); stty size", "Enter")
            #expect(try waitFor(socket, "42\n30 100"))
            _ = try tmux(socket, "resize-window", "-t", "t", "-x", "120", "-y", "40")
            _ = try tmux(socket, "send-keys", "-t", "t", "stty size", "Enter")
            #expect(try waitFor(socket, "40 120"))
            _ = try tmux(socket, "send-keys", "-t", "t", "sleep 1001", "Enter")
            try waitForGuestProcess("sleep 1001")
            _ = try tmux(socket, "send-keys", "-t", "t", "C-c")
            _ = try tmux(socket, "send-keys", "-t", "t", "echo still-$((1+1))-alive; exit 3", "Enter")
            #expect(try waitFor(socket, "still-2-alive"))
            #expect(try waitFor(socket, "EXITED=3"))
            // The host terminal is back in canonical mode.
            #expect(try waitFor(socket, "canonical=2"))
        }

        @Test func ctrlZSuspendsAndCtrlDLeaves() throws {
            let socket = "uvm-test-z-\(getpid())"
            defer { _ = try? tmux(socket, "kill-server") }
            _ = try tmux(socket, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", "sh")
            _ = try tmux(socket, "send-keys", "-t", "t", "\(Harness.uvm); echo EXITED=$?", "Enter")
            _ = try tmux(socket, "send-keys", "-t", "t", "echo ready-$((3*3))", "Enter")
            #expect(try waitFor(socket, "ready-9"))
            _ = try tmux(socket, "send-keys", "-t", "t", "sleep 1002", "Enter")
            try waitForGuestProcess("sleep 1002")
            // Job control in the guest: the job stops, the shell is back.
            _ = try tmux(socket, "send-keys", "-t", "t", "C-z")
            #expect(try waitFor(socket, "Stopped"))
            _ = try tmux(socket, "send-keys", "-t", "t", "echo after-z-$((2+2)); kill -9 %1", "Enter")
            #expect(try waitFor(socket, "after-z-4"))
            // ash notices the killed job only when it next reaps (at a prompt, or `jobs`); until
            // then Ctrl-D answers "You have stopped jobs", as it would for a person typing fast.
            let reaped = try Harness.waitUntil(timeout: 60) {
                if try screen(socket).contains("Killed") { return true }
                _ = try tmux(socket, "send-keys", "-t", "t", "jobs", "Enter")
                usleep(1_000_000)
                return false
            }
            let shown = try screen(socket)
            #expect(reaped, "the shell never reported the killed job:\n\(shown)")
            // Ctrl-D at the prompt is EOF for the shell: it exits 0, and so does uvm.
            _ = try tmux(socket, "send-keys", "-t", "t", "C-d")
            #expect(try waitFor(socket, "EXITED=0"))
        }

        @Test func withoutATerminalTheShellReadsStdin() throws {
            let r = try Harness.run([], stdin: Data("echo $((2+3))\nexit 4\n".utf8))
            #expect(r.out == "5\n")
            #expect(r.status == 4)
        }
    }
}
