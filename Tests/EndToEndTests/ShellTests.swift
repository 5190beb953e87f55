import Foundation
import Testing

extension EndToEnd {
    /// `uvm` alone: a login shell on a real pty in the guest, driven through tmux like a person.
    @Suite struct ShellTests {
        func tmux(_ socket: String, _ args: String...) throws -> String {
            try Harness.runProcess("/usr/bin/tmux", ["-L", socket] + args, stdin: nil, env: Harness.environment()).out
        }

        func screen(_ socket: String) throws -> String { try tmux(socket, "capture-pane", "-t", "t", "-p") }

        func waitFor(_ socket: String, _ text: String) throws -> Bool {
            try Harness.waitUntil(timeout: 60) { try screen(socket).contains(text) }
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
            _ = try tmux(socket, "send-keys", "-t", "t", "sleep 100", "Enter")
            usleep(500_000)
            _ = try tmux(socket, "send-keys", "-t", "t", "C-c")
            _ = try tmux(socket, "send-keys", "-t", "t", "echo still-$((1+1))-alive; exit 3", "Enter")
            #expect(try waitFor(socket, "still-2-alive"))
            #expect(try waitFor(socket, "EXITED=3"))
            // The host terminal is back in canonical mode.
            #expect(try waitFor(socket, "canonical=2"))
        }

        @Test func withoutATerminalTheShellReadsStdin() throws {
            let r = try Harness.run([], stdin: Data("echo $((2+3))\nexit 4\n".utf8))
            #expect(r.out == "5\n")
            #expect(r.status == 4)
        }
    }
}
