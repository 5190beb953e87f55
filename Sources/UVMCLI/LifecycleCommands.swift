import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Distros
import Glibc
import Settings
import Wire

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List the distros: state (Stopped, Running, Stopping), clients, and when an idle stop is due.",
        discussion: "An instance stops [general] instanceIdleTimeout after its last client (a shell, an exec) has gone; the VM stops [vm] vmIdleTimeout after its last instance. Does not start anything.")
    @OptionGroup var format: FormatOption

    func run() throws {
        let paths = Paths.current()
        let status: VMStatus
        if let conn = DaemonConnection.connect(path: paths.socket) {
            status = try conn.call(StatusRequest())
        } else {
            // No uvmd: nothing runs; the distros are what is installed.
            status = VMStatus(state: "Stopped", daemonPID: 0, sessions: 0)
        }
        // Without uvmd (which reads uvm.conf) the default is unknown here: the installed ones.
        let instances = status.instances ?? DistroStore(paths: paths, defaultDistro: "").installed().map {
            InstanceStatus(name: $0.name, state: "Stopped", clients: 0)
        }
        if format.format == .json {
            struct Listing: Encodable { var vm: VMSummary; var instances: [InstanceStatus] }
            struct VMSummary: Encodable { var state: String; var clients: Int; var idleStopInSeconds: Double?; var vmIdleTimeout: String?; var instanceIdleTimeout: String? }
            let vm = VMSummary(state: status.state, clients: status.clients ?? status.sessions, idleStopInSeconds: status.idleStopInSeconds,
                               vmIdleTimeout: status.vmIdleTimeout, instanceIdleTimeout: status.instanceIdleTimeout)
            try printJSON(Listing(vm: vm, instances: instances))
            return
        }
        var rows = [["NAME", "STATE", "CLIENTS", "IDLE STOP"]]
        rows.append(["(vm)", status.state, "\(status.clients ?? status.sessions)", dueText(status.idleStopInSeconds)])
        for i in instances {
            rows.append([(i.isDefault ? "* " : "  ") + i.name, i.state, "\(i.clients)", idleText(i)])
        }
        rows[1][0] = "  (vm)"
        rows[0][0] = "  NAME"
        let widths = (0..<4).map { c in rows.map { $0[c].count }.max() ?? 0 }
        for r in rows {
            let line = r.enumerated().map { $1 + String(repeating: " ", count: widths[$0] - $1.count) }.joined(separator: "  ")
            print(String(line.reversed().drop { $0 == " " }.reversed()))
        }
    }
}

/// An instance's idle stop, or what keeps it running past one.
func idleText(_ i: InstanceStatus) -> String {
    guard let kept = i.keptBy, !kept.isEmpty else { return dueText(i.idleStopInSeconds) }
    return "kept by " + kept.joined(separator: ", ") + (i.idleStopInSeconds.map { " (asks again \(dueText($0)))" } ?? "")
}

func dueText(_ seconds: Double?) -> String {
    guard let seconds else { return "-" }
    return "in \(Double(Int((seconds * 10).rounded())) / 10) s"
}

/// The reaper's part of `uvm status`.
func lifecycleLines(_ s: VMStatus) -> [(String, String)] {
    var lines: [(String, String)] = []
    if let c = s.clients {
        var idle = "\(c) client(s)"
        if let due = s.idleStopInSeconds { idle += ", idle stop \(dueText(due))" }
        if let v = s.vmIdleTimeout, let i = s.instanceIdleTimeout { idle += " (vmIdleTimeout \(v), instanceIdleTimeout \(i))" }
        lines.append(("idle", idle))
    }
    for i in s.instances ?? [] where i.state != "Stopped" {
        let idle = i.keptBy?.isEmpty == false ? ", " + idleText(i) : i.idleStopInSeconds.map { ", idle stop \(dueText($0))" } ?? ""
        lines.append(("distro", "\(i.name): \(i.state), \(i.clients) client(s)" + idle))
    }
    return lines
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Show the settings in effect and where each came from.",
        discussion: """
            uvm reads ${XDG_CONFIG_HOME:-~/.config}/uvm/uvm.conf, or the file named by UVM_CONFIG, in WSL's INI style:

              [vm]
              memory = 4GB
              processors = 2
              vmIdleTimeout = 60s        # 500ms, 2s, 1m, plain milliseconds; never or negative: no idle stop
              [general]
              instanceIdleTimeout = 15s
              defaultDistro = busybox

            UVM_* environment variables override the file. uvmd reads the settings when it starts: after a change, `uvm stop` and stop uvmd (or let it be restarted).
            """,
        subcommands: [ShowConfig.self], defaultSubcommand: ShowConfig.self)
}

struct ShowConfig: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Print every setting, its value and its source (default, FILE:LINE, env VAR).")
    @OptionGroup var format: FormatOption
    func run() throws {
        // GKeyFile reads the file, and only uvmd links GLib (every `uvm` would pay for loading it).
        let uvmd = ProcessInfo.processInfo.environment["UVMD_PATH"] ?? DaemonConnection.siblingExecutable("uvmd")
        let args = [uvmd, "config", "show", "--format", format.format.rawValue]
        let cargs = args.map { strdup($0) } + [nil]
        execv(uvmd, cargs)
        throw CLIError("cannot run \(uvmd): \(String(cString: strerror(errno))) (build it with `make build`)")
    }
}
