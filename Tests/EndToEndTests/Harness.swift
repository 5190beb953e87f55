import Foundation
import Testing

/// Every end-to-end suite shares one VM (one of them stops it), so they run one test at a time.
@Suite(.serialized) enum EndToEnd {}

/// Runs the real `uvm` binaries against a real VM. `make test` sets UVM_BIN (the build's bin
/// directory) and UVM_TEST_HOME (uvm's state for the tests, cleaned up by make afterwards).
enum Harness {
    static let bin: String = {
        if let b = ProcessInfo.processInfo.environment["UVM_BIN"] { return b }
        // Fallback for a plain `swift test`: the package's own build directory.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        for config in ["release", "debug"] where FileManager.default.fileExists(atPath: root.appendingPathComponent(".build/\(config)/uvm").path) {
            return root.appendingPathComponent(".build/\(config)").path
        }
        return root.appendingPathComponent(".build/debug").path
    }()

    static let home: String = ProcessInfo.processInfo.environment["UVM_TEST_HOME"] ?? "/tmp/uvm-test-\(getuid())"

    static var uvm: String { "\(bin)/uvm" }

    /// A file of Tests/EndToEndTests/Fixtures. `UVM_TEST_FIXTURES` names a copy when the tests run
    /// as an account that cannot read the checkout (`make test` as root runs them as `uvmtest`).
    static func fixture(_ name: String) -> String {
        let dir = ProcessInfo.processInfo.environment["UVM_TEST_FIXTURES"]
            ?? URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures").path
        return "\(dir)/\(name)"
    }

    struct Result {
        var status: Int32
        var stdout: Data
        var stderr: Data
        var out: String { String(decoding: stdout, as: UTF8.self) }
        var err: String { String(decoding: stderr, as: UTF8.self) }
    }

    static func environment(home: String = Harness.home, extra: [String: String] = [:]) -> [String: String] {
        var env = ProcessInfo.processInfo.environment
        env["UVM_HOME"] = home
        env["UVMD_PATH"] = "\(bin)/uvmd"
        env["PATH"] = "\(bin):" + (env["PATH"] ?? "/usr/bin:/bin")
        // The user's own uvm.conf must not change what the tests see; tests that want one set UVM_CONFIG.
        env["XDG_CONFIG_HOME"] = "\(home)/config"
        env["UVM_CONFIG"] = nil
        for (k, v) in extra { env[k] = v }
        return env
    }

    /// Runs `uvm ARGS` with `stdin` (nil: /dev/null) and returns what it printed.
    static func run(_ args: [String], stdin: Data? = nil, home: String = Harness.home, env extra: [String: String] = [:],
                    cwd: String = "/", timeout: Double = 300) throws -> Result {
        try runProcess(uvm, args, stdin: stdin, env: environment(home: home, extra: extra), timeout: timeout, cwd: cwd)
    }

    /// Runs a shell pipeline with `uvm` on PATH, as a user would type it.
    static func shell(_ script: String, home: String = Harness.home, env extra: [String: String] = [:], cwd: String = "/") throws -> Result {
        try runProcess("/bin/sh", ["-c", script], stdin: nil, env: environment(home: home, extra: extra), cwd: cwd)
    }

    /// Runs in `cwd`: "/" unless a test wants otherwise, because a host folder inside a share
    /// would change where guest commands start. Spawned with posix_spawn: Foundation's Process.run
    /// (Swift 6.3.1) now and then over-reads /proc/self/fd and crashes the whole test run
    /// (swift-corelibs-foundation PR #5472; seen in ShellTests).
    static func runProcess(_ path: String, _ args: [String], stdin: Data?, env: [String: String], timeout: Double = 300,
                           cwd: String = "/") throws -> Result {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1], inPipe: [Int32] = [-1, -1]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0, pipe(&inPipe) == 0 else { throw CocoaError(.fileWriteUnknown) }
        for fd in outPipe + errPipe + inPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        if stdin == nil {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        } else {
            posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        }
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        guard addChdir(&actions, cwd) == 0 else { throw CocoaError(.fileReadNoSuchFile) }
        let (pid, rc) = posixSpawn(path, args, env: env, actions: &actions)
        for fd in [outPipe[1], errPipe[1], inPipe[0]] { close(fd) }
        guard rc == 0 else {
            for fd in [outPipe[0], errPipe[0], inPipe[1]] { close(fd) }
            throw CocoaError(.executableLoad)
        }
        // Read both outputs (and feed stdin) concurrently: any of them can fill a pipe.
        let outData = Box(), errData = Box()
        let group = DispatchGroup()
        for (fd, box) in [(outPipe[0], outData), (errPipe[0], errData)] {
            group.enter()
            DispatchQueue.global().async {
                var buf = [UInt8](repeating: 0, count: 65536)
                while true {
                    let n = read(fd, &buf, buf.count)
                    if n > 0 { box.data.append(contentsOf: buf[..<n]); continue }
                    if n < 0 && errno == EINTR { continue }
                    break
                }
                close(fd)
                group.leave()
            }
        }
        let input = inPipe[1]
        if let stdin {
            DispatchQueue.global().async {
                signal(SIGPIPE, SIG_IGN)
                stdin.withUnsafeBytes { raw in
                    var off = 0
                    while off < raw.count {
                        let n = write(input, raw.baseAddress! + off, raw.count - off)
                        if n > 0 { off += n } else if n < 0 && errno == EINTR { continue } else { break }
                    }
                }
                close(input)
            }
        } else {
            close(input)
        }
        // A hung command must fail its test, not hang the whole run.
        let killed = Box()
        let watchdog = DispatchWorkItem { kill(pid, SIGKILL); killed.data = Data([1]) }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: watchdog)
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
        watchdog.cancel()
        // Output ends with the process, unless something it started still holds the pipes.
        let drained = group.wait(timeout: .now() + 10) == .success
        #expect(drained, "output of \(path) \(args) still open 10 s after it exited: a descendant holds the pipe")
        #expect(killed.data.isEmpty, "\(path) \(args) killed after \(timeout) s")
        // The shell's convention: 128+N when it died of signal N (Process gave N alone).
        let status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        return Result(status: status, stdout: outData.data, stderr: errData.data)
    }

    /// posix_spawn of `path ARGS` with `env`; the pid and posix_spawn's result.
    static func posixSpawn(_ path: String, _ args: [String], env: [String: String], actions: inout posix_spawn_file_actions_t) -> (pid_t, Int32) {
        let argv = ([path] + args).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { envp.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
        return (pid, rc)
    }

    /// glibc's posix_spawn_file_actions_addchdir_np (2.29+), which Swift's Glibc module does not
    /// export.
    nonisolated(unsafe) static let addChdir: @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32 = {
        let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addchdir_np")
        precondition(sym != nil, "glibc without posix_spawn_file_actions_addchdir_np")
        return unsafeBitCast(sym, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32).self)
    }()

    /// Starts `uvm ARGS` without waiting for it.
    static func start(_ args: [String], home: String = Harness.home) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: uvm)
        p.currentDirectoryURL = URL(fileURLWithPath: "/")
        p.arguments = args
        p.environment = environment(home: home)
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    /// Ends the uvmd serving `home` (and with it its VM), for tests that start their own.
    static func stopDaemon(home: String) {
        let pidFile = "\(home)/state/uvmd.lock"
        _ = try? run(["stop"], home: home)
        if let r = try? run(["status", "--format", "json"], home: home),
           let json = try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any],
           let pid = json["daemonPID"] as? Int {
            kill(pid_t(pid), SIGTERM)
        }
        _ = pidFile
    }

    static func waitUntil(timeout: Double, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return false
    }
}

final class Box: @unchecked Sendable { var data = Data() }
