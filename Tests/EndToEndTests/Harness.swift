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
    /// would change where guest commands start.
    static func runProcess(_ path: String, _ args: [String], stdin: Data?, env: [String: String], timeout: Double = 300,
                           cwd: String = "/") throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.currentDirectoryURL = URL(fileURLWithPath: cwd)
        p.arguments = args
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let inPipe = Pipe()
        p.standardInput = stdin == nil ? FileHandle.nullDevice : inPipe
        try p.run()
        // Read both outputs (and feed stdin) concurrently: any of them can fill a pipe.
        let outData = Box(), errData = Box()
        let group = DispatchGroup()
        for (pipe, box) in [(out, outData), (err, errData)] {
            group.enter()
            DispatchQueue.global().async {
                box.data = pipe.fileHandleForReading.readDataToEndOfFile()
                group.leave()
            }
        }
        if let stdin {
            DispatchQueue.global().async {
                try? inPipe.fileHandleForWriting.write(contentsOf: stdin)
                try? inPipe.fileHandleForWriting.close()
            }
        }
        // A hung command must fail its test, not hang the whole run.
        let deadline = DispatchTime.now() + timeout
        let watchdog = DispatchWorkItem { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: deadline, execute: watchdog)
        p.waitUntilExit()
        watchdog.cancel()
        // Output ends with the process, unless something it started still holds the pipes.
        let drained = group.wait(timeout: .now() + 10) == .success
        #expect(drained, "output of \(path) \(args) still open 10 s after it exited: a descendant holds the pipe")
        #expect(p.terminationReason == .exit || p.terminationStatus != SIGKILL, "\(path) \(args) killed after \(timeout) s")
        return Result(status: p.terminationStatus, stdout: outData.data, stderr: errData.data)
    }

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
