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
        return "uvmd log:\n" + text.split(separator: "\n").suffix(15).joined(separator: "\n")
    }

    /// `uvm status --format json`.
    static func status(home: String, env: [String: String] = [:]) throws -> [String: Any] {
        let r = try run(["status", "--format", "json"], home: home, env: env)
        return (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
    }

    /// `uvm list --format json`.
    static func list(home: String, env: [String: String] = [:]) throws -> (vm: [String: Any], instances: [[String: Any]]) {
        let r = try run(["list", "--format", "json"], home: home, env: env)
        let json = (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
        return (json["vm"] as? [String: Any] ?? [:], json["instances"] as? [[String: Any]] ?? [])
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

    /// `uvm ARGS` running in the background with a pipe as stdin (kept open until written/closed).
    static func startWithInput(_ args: [String], home: String, env: [String: String]) throws -> (Process, Pipe, Pipe) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: uvm)
        p.arguments = args
        p.environment = environment(home: home, extra: env)
        let input = Pipe(), err = Pipe()
        p.standardInput = input
        p.standardOutput = FileHandle.nullDevice
        p.standardError = err
        try p.run()
        return (p, input, err)
    }
}
