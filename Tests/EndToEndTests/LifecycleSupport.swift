import Foundation
import Testing

extension Harness {
    /// A state directory with its own uvmd and VM, configured by `config` (the text of a uvm.conf
    /// that UVM_CONFIG names), stopped and removed afterwards.
    static func withConfiguredHome(_ name: String, config: String, _ body: (_ home: String, _ env: [String: String]) throws -> Void) throws {
        let home = "/tmp/uvm-lc-\(getpid())-\(name)"
        try? FileManager.default.removeItem(atPath: home)
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        let file = "\(home)/uvm.conf"
        _ = FileManager.default.createFile(atPath: file, contents: Data(config.utf8))
        defer {
            stopDaemon(home: home)
            try? FileManager.default.removeItem(atPath: home)
        }
        try body(home, ["UVM_CONFIG": file])
    }

    /// The end of uvmd's log, for failure messages.
    static func daemonLog(_ home: String) -> String {
        let text = (try? String(contentsOfFile: "\(home)/state/uvmd.log", encoding: .utf8)) ?? "(no uvmd log)"
        var out = "uvmd log:\n" + text.split(separator: "\n").suffix(15).joined(separator: "\n")
        // The guest's side (the agent logs to the console): what it did before a failure.
        for name in ["console.log", "console.log.failed"] {
            guard let console = try? String(contentsOfFile: "\(home)/state/\(name)", encoding: .utf8) else { continue }
            out += "\n\(name):\n" + console.split(separator: "\n").suffix(10).joined(separator: "\n")
        }
        return out
    }

    /// `uvm status --format json`.
    static func status(home: String, env: [String: String] = [:]) throws -> [String: Any] {
        let r = try spawnRun(["status", "--format", "json"], home: home, env: env)
        return (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
    }

    /// `uvm list --format json`.
    static func list(home: String, env: [String: String] = [:]) throws -> (vm: [String: Any], instances: [[String: Any]]) {
        let r = try spawnRun(["list", "--format", "json"], home: home, env: env)
        let json = (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
        return (json["vm"] as? [String: Any] ?? [:], json["instances"] as? [[String: Any]] ?? [])
    }

    /// SIGKILL to the uvmd serving `home`, then waits until it is really gone: its process has
    /// exited and its socket refuses connections. (A multi-threaded process shows as a zombie
    /// before its last thread has let go of its descriptors: until then the kernel still queues
    /// connections on its socket, and a command sent there is reset.)
    @discardableResult
    static func killDaemon(_ pid: Int, home: String) -> Bool {
        kill(pid_t(pid), SIGKILL)
        return waitUntil(timeout: 30) { !alive(pid) && !socketAccepts("\(home)/state/uvmd.sock") }
    }

    /// Whether something accepts connections on the unix socket at `path`.
    static func socketAccepts(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
    }

    /// Alive and not a zombie.
    static func alive(_ pid: Int) -> Bool {
        guard kill(pid_t(pid), 0) == 0 else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
        return !stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
    }

    /// QEMU processes running the libvirt domain `name`.
    static func qemuProcesses(domain name: String) -> [Int] {
        let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int($0) }
        return pids.filter { pid in
            guard alive(pid), let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let args = String(decoding: cmd, as: UTF8.self).split(separator: "\0")
            return args.first?.contains("qemu") == true && args.contains { $0.contains("guest=\(name),") || $0 == "guest=\(name)" }
        }
    }

    /// A child started with posix_spawn: these tests start hundreds of processes, and Foundation's
    /// Process.run (Swift 6.3.1) now and then over-reads /proc/self/fd and crashes the test run
    /// (swift-corelibs-foundation PR #5472). Output goes to files, read after the exit.
    final class Spawned {
        let pid: pid_t
        private(set) var input: Int32
        let outFile: String
        let errFile: String

        init(pid: pid_t, input: Int32, outFile: String, errFile: String) {
            self.pid = pid
            self.input = input
            self.outFile = outFile
            self.errFile = errFile
        }

        deinit {
            closeInput()
            unlink(outFile)
            unlink(errFile)
        }

        func write(_ text: String) {
            guard input >= 0 else { return }
            _ = text.withCString { Glibc.write(input, $0, strlen($0)) }
        }

        func closeInput() {
            if input >= 0 { close(input); input = -1 }
        }

        private var exitStatus: Int32?

        /// Waits for the exit; the shell's convention for the status (128+N: signal N). A process
        /// still running after `timeout` seconds is killed (137) and the test fails saying so: a
        /// hang fails one test, not the whole run (as a hung `uvm exec` once did in CI).
        @discardableResult
        func wait(timeout: Double = Harness.hangBound, sourceLocation: SourceLocation = #_sourceLocation) -> Int32 {
            if let exitStatus { return exitStatus }
            let deadline = Date().addingTimeInterval(timeout)
            while isRunning {
                if Date() >= deadline {
                    kill(pid, SIGKILL)
                    Issue.record("process \(pid) still running after \(Int(timeout)) s: killed", sourceLocation: sourceLocation)
                    break
                }
                usleep(20_000)
            }
            if let exitStatus { return exitStatus }
            var raw: Int32 = 0
            while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
            let status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
            exitStatus = status
            return status
        }

        var isRunning: Bool {
            if exitStatus != nil { return false }
            var raw: Int32 = 0
            let r = waitpid(pid, &raw, WNOHANG)
            if r == pid { exitStatus = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f); return false }
            return r == 0
        }

        var stdout: Data { FileManager.default.contents(atPath: outFile) ?? Data() }
        var stderr: String { String(decoding: FileManager.default.contents(atPath: errFile) ?? Data(), as: UTF8.self) }
    }

    private static let spawnCounter = Counter()
    final class Counter: @unchecked Sendable {
        private let lock = NSLock()
        private var n = 0
        func next() -> Int { lock.lock(); defer { lock.unlock() }; n += 1; return n }
    }

    /// Starts `path ARGS`; stdin is a pipe kept open when `keepInput`, else /dev/null.
    static func spawn(_ path: String, _ args: [String], env: [String: String], keepInput: Bool = false) throws -> Spawned {
        let n = spawnCounter.next()
        let base = "/tmp/uvm-lc-spawn-\(getpid())-\(n)"
        let outFile = base + ".out", errFile = base + ".err"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var fds: [Int32] = [-1, -1]
        if keepInput {
            guard pipe(&fds) == 0 else { throw CocoaError(.fileWriteUnknown) }
            for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_addopen(&actions, 1, outFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let (pid, rc) = posixSpawn(path, args, env: env, actions: &actions)
        if keepInput { close(fds[0]) }
        guard rc == 0 else {
            if keepInput { close(fds[1]) }
            throw CocoaError(.executableLoad)
        }
        return Spawned(pid: pid, input: keepInput ? fds[1] : -1, outFile: outFile, errFile: errFile)
    }

    /// `uvm ARGS` in the background (see `Spawned`).
    static func spawnUVM(_ args: [String], home: String, env: [String: String], keepInput: Bool = false) throws -> Spawned {
        try spawn(uvm, args, env: environment(home: home, extra: env), keepInput: keepInput)
    }

    /// How long any command a test starts may take before it counts as hung (killed, and the
    /// test fails): far beyond the slowest (a Debian install under TCG).
    static let hangBound: Double = 900

    /// `uvm ARGS` to the end, through posix_spawn (see `Spawned`). A command still running after
    /// `timeout` is killed (status 137) so that a hang fails the test instead of the run.
    static func spawnRun(_ args: [String], home: String, env: [String: String] = [:], timeout: Double = hangBound) throws -> Result {
        let p = try spawnUVM(args, home: home, env: env)
        if !waitUntil(timeout: timeout, { !p.isRunning }) {
            kill(p.pid, SIGKILL)
            p.wait()
            return Result(status: 137, stdout: p.stdout, stderr: Data("(killed after \(timeout) s) \(p.stderr)".utf8))
        }
        let status = p.wait()
        return Result(status: status, stdout: p.stdout, stderr: Data(p.stderr.utf8))
    }
}
