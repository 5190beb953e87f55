import Foundation
import Testing

/// uvm-init's spawn path, many times over, on the host (no VM). The work happens in spawn-soak,
/// a process of its own: ChildReaper reaps with waitpid(-1) and would take the children of the
/// other tests in this process.
@Suite struct SpawnSoakTests {
    /// Past 65,536: each spawn used to write a byte into the reaper's wake-up pipe, which only an
    /// idle reaper drained, so while one child lived (an instance's init) the 65,537th blocked.
    // Root, as the agent is: a spawn sets the account's groups, which needs CAP_SETGID.
    @Test(.enabled(if: getuid() == 0, "the agent's spawn path sets groups: root only"))
    func spawnsWellPast65536WithOneChildAlive() throws {
        let count = 70_000
        let r = try runSoak(count: count, timeout: 900)
        print("spawn-soak: \(r.lastLine)")
        #expect(r.status == 0, "spawn-soak: status \(r.status), output: \(r.output)")
        let fields = Dictionary(uniqueKeysWithValues: r.lastLine.split(separator: " ").compactMap { f -> (String, Int)? in
            let kv = f.split(separator: "=")
            guard kv.count == 2, let v = Int(kv[1]) else { return nil }
            return (String(kv[0]), v)
        })
        #expect(fields["spawns"] == count, "\(r.output)")
        // Bounded: nothing kept per child once it has been reaped.
        #expect(fields["waiters"] == 0 && fields["unclaimed"] == 0 && fields["ignored"] == 0, "\(r.lastLine)")
        let warm = try #require(fields["rssAfterWarmupKiB"]), end = try #require(fields["rssEndKiB"])
        #expect(warm > 0 && end - warm < 16 * 1024, "VmRSS grew from \(warm) KiB to \(end) KiB: \(r.lastLine)")
    }

    private func runSoak(count: Int, timeout: Double) throws -> (status: Int32, output: String, lastLine: String) {
        // The test bundle and the package's executables share the build directory.
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let tool = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("spawn-soak").path
        let outFile = "/tmp/spawn-soak-\(getpid()).out"
        defer { unlink(outFile) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let args: [String] = [tool, String(count)]
        let argv = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, tool, &actions, nil, argv, environ)
        guard rc == 0 else { return (-1, "cannot start \(tool): \(String(cString: strerror(rc)))", "") }
        let deadline = Date().addingTimeInterval(timeout)
        var raw: Int32 = 0
        while waitpid(pid, &raw, WNOHANG) == 0 {
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(100_000)
        }
        let output = (try? String(contentsOfFile: outFile, encoding: .utf8)) ?? ""
        let status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        return (status, output, output.split(separator: "\n").last.map(String.init) ?? "")
    }
}
