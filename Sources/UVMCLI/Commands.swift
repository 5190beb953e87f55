import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Settings
import Wire

public struct UVM: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "uvm",
        abstract: "A lightweight Linux utility VM: run Linux commands and shells in it, on demand.",
        discussion: """
            uvm boots a small VM (its own kernel, through libvirt) the first time it is needed and runs distributions inside it. `uvm` alone opens a shell; `uvm exec -- CMD` runs a command with your stdin, stdout, stderr and exit status. uvmd, the host service, is started automatically.

            Settings live in ~/.config/uvm/uvm.conf (or $UVM_CONFIG), WSL's INI style; `uvm config show` lists them. The VM stops by itself when idle ([vm] vmIdleTimeout, [general] instanceIdleTimeout).

            Environment: UVM_HOME (keep state there), UVM_CONFIG, UVM_ACCEL=auto|kvm|tcg, UVM_MEMORY_MB, UVM_CPUS, UVM_LIBVIRT_URI, UVM_VM_IDLE_TIMEOUT, UVM_INSTANCE_IDLE_TIMEOUT, UVM_LOCALHOST_FORWARDING=0|1, UVM_HOME_SHARE, UVM_SOCKET.
            """,
        version: Paths.buildVersion(),
        subcommands: [Shell.self, Exec.self, Start.self, Stop.self, Status.self, List.self, Install.self, Import.self, Export.self,
                      Unregister.self, Default.self, Terminate.self, Manage.self, Ports.self, Share.self, Copy.self, Mount.self, Unmount.self, ConfigCommand.self, Doctor.self],
        defaultSubcommand: Shell.self)

    public init() {}

    /// `main()`, except that uvm's own failures exit 125 with one line (a command's status is its own).
    public static func run() -> Never {
        do {
            var command = try parseAsRoot()
            try command.run()
            Glibc.exit(0)
        } catch let e as CLIError {
            printError(e.message)
            Glibc.exit(SessionRunner.ownFailure)
        } catch {
            exit(withError: error)
        }
    }
}

struct DistroOptions: ParsableArguments {
    @Option(name: [.short, .long], help: "Distribution to run in (default: the configured default distro).")
    var distro: String?

    @Option(name: [.short, .long], help: "User in the distro, by name or uid (default: the distro's default user).")
    var user: String?

    @Flag(help: "If the distro's instance is not running, start it without its /etc/uvm.conf (to repair a file that keeps it from starting).")
    var ignoreConfig = false
}

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in the VM.",
        discussion: """
            Your stdin reaches the command (binary-safe; EOF is passed on), its stdout and stderr arrive on yours, and uvm exits with its exit status (128+N if it died of signal N). SIGINT, SIGTERM and SIGHUP sent to uvm are passed to the command. Exit status 125 means uvm itself failed (the message says why).

            Example: uvm exec -- sh -c 'uname -r; exit 3'
            """)

    @OptionGroup var distro: DistroOptions

    @Option(name: .customLong("cd"), help: "Working directory in the guest (default: the folder you are in, if it is in a share; else the user's home).")
    var cwd: String?

    @Option(name: [.short, .long], help: "Set an environment variable in the guest (KEY=VALUE; repeatable).")
    var env: [String] = []

    @Flag(name: [.short, .customLong("tty")], help: "Run on a terminal (pty) in the guest, for interactive programs.")
    var tty = false

    @Argument(parsing: .remaining, help: "The command and its arguments (after --).")
    var command: [String] = []

    func validate() throws {
        let cmd = command.first == "--" ? Array(command.dropFirst()) : command
        guard !cmd.isEmpty else { throw ValidationError("no command given: uvm exec [OPTIONS] -- COMMAND [ARG...]") }
        for kv in env where !kv.contains("=") || kv.hasPrefix("=") {
            throw ValidationError("--env \(kv): expected KEY=VALUE")
        }
    }

    func run() throws {
        let cmd = command.first == "--" ? Array(command.dropFirst()) : command
        var request = ExecRequest(argv: cmd, env: env, cwd: cwd, user: distro.user, distro: distro.distro,
                                  tty: tty && isatty(0) == 1)
        if distro.ignoreConfig { request.ignoreDistroConfig = true }
        throw ExitCode(try SessionRunner.run(request, paths: .current()))
    }
}

struct Shell: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shell",
        abstract: "Open a shell in the VM (what `uvm` alone does).",
        discussion: "On a terminal you get an interactive login shell; otherwise the shell reads commands from stdin, like sh.")

    @OptionGroup var distro: DistroOptions

    func run() throws {
        let interactive = isatty(0) == 1
        var request = ExecRequest(argv: [], user: distro.user, distro: distro.distro, tty: interactive)
        if distro.ignoreConfig { request.ignoreDistroConfig = true }
        request.shell = true
        throw ExitCode(try SessionRunner.run(request, paths: .current()))
    }
}

struct FormatOption: ParsableArguments {
    enum Format: String, ExpressibleByArgument, CaseIterable { case text, json }
    @Option(help: "Output format: text or json.")
    var format: Format = .text
}

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Boot the VM now (any command boots it when needed anyway).")
    @OptionGroup var format: FormatOption
    func run() throws {
        let status = try DaemonConnection.connectOrLaunch(paths: .current()).call(StartRequest())
        try printStatus(status, format.format)
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Shut the VM down cleanly (running commands end with a message saying so).",
        discussion: "Without it the VM stops by itself once idle: see `uvm list` and `uvm config show`.")
    @OptionGroup var format: FormatOption
    func run() throws { try askRunningDaemon(StopRequest(), format.format) }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the VM's state, accelerator, kernel, uptime, QEMU pid, memory, clients and when an idle stop is due.")
    @OptionGroup var format: FormatOption
    func run() throws { try askRunningDaemon(StatusRequest(), format.format) }
}

/// `call` needs no VM: without a uvmd there is nothing to ask (and nothing to start).
func askRunningDaemon<C: DaemonCall>(_ call: C, _ format: FormatOption.Format) throws where C.Response == VMStatus {
    guard let conn = DaemonConnection.connect(path: Paths.current().socket) else {
        print(format == .json ? #"{"daemon":"not running","state":"Stopped"}"# : "state:   Stopped (uvmd is not running)")
        return
    }
    try printStatus(try conn.call(call), format)
}

struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check what uvm needs (libvirt, QEMU, /dev/kvm, the kernel, images) and say how to fix what is missing.")
    @OptionGroup var format: FormatOption
    func run() throws {
        // The checks need libvirt, which the CLI does not link (it would slow every command down):
        // uvmd runs them.
        let uvmd = ProcessInfo.processInfo.environment["UVMD_PATH"] ?? DaemonConnection.siblingExecutable("uvmd")
        let args = [uvmd, "doctor", "--format", format.format.rawValue]
        let cargs = args.map { strdup($0) } + [nil]
        execv(uvmd, cargs)
        throw CLIError("cannot run \(uvmd): \(String(cString: strerror(errno))) (build it with `make build`)")
    }
}

func printStatus(_ s: VMStatus, _ format: FormatOption.Format) throws {
    if format == .json {
        return try printJSON(s)
    }
    var lines = [("state", s.state)]
    if let a = s.accelerator { lines.append(("accel", a + (s.acceleratorReason.map { " (\($0))" } ?? ""))) }
    if let k = s.kernelRelease { lines.append(("kernel", k)) }
    if let u = s.uptimeSeconds { lines.append(("uptime", "\(Double(Int(u * 10)) / 10) s")) }
    if let p = s.qemuPID { lines.append(("qemu", "pid \(p)")) }
    if let m = s.memoryMiB {
        var mem = "\(m) MiB"
        if let t = s.guestMemTotalKiB, let a = s.guestMemAvailableKiB {
            mem += " (guest: \(t / 1024) MiB total, \((t - min(a, t)) / 1024) MiB used, \(a / 1024) MiB available"
            if let c = s.guestMemCachedKiB { mem += ", \(c / 1024) MiB page cache" }
            mem += ")"
        }
        if let r = s.qemuRSSKiB { mem += "; QEMU holds \(r / 1024) MiB of the host's" }
        lines.append(("memory", mem))
    }
    if let t = s.guestSwapTotalKiB { lines.append(("swap", t == 0 ? "none" : "\((s.guestSwapUsedKiB ?? 0) / 1024) MiB used of \(t / 1024) MiB")) }
    if let policy = s.memoryReclaim {
        var text = policy
        if let r = s.lastReclaim {
            let ago = s.lastReclaimSecondsAgo.map { "\(Int($0)) s ago" } ?? "earlier"
            text += "; last \(ago): page cache \(r.cacheBeforeKiB / 1024) -> \(r.cacheAfterKiB / 1024) MiB in \(r.milliseconds) ms"
        }
        lines.append(("reclaim", text))
    }
    if let d = s.domain { lines.append(("domain", d + (s.libvirtURI.map { " on \($0)" } ?? ""))) }
    if s.state == "Stopped", let stop = s.lastStop { lines.append(("stopped", stop)) }
    lines.append(("uvmd", "pid \(s.daemonPID)" + (s.daemonRSSKiB.map { ", \($0 / 1024) MiB resident" } ?? "") + ", \(s.sessions) session(s)"))
    lines += lifecycleLines(s)
    for d in s.disks ?? [] {
        lines.append(("disk", "\(d.name): \(formatMiB(d.allocatedBytes)) on the host of at most \(formatMiB(d.sizeBytes)) (sparse)"))
    }
    for (k, v) in lines {
        let key = (k + ":") + String(repeating: " ", count: max(0, 9 - k.count - 1))
        print("\(key)\(v)")
    }
}

func formatMiB(_ bytes: UInt64) -> String {
    bytes >= 10 << 30 ? "\(bytes >> 30) GiB" : "\(bytes >> 20) MiB"
}

/// `--format json` output: sorted keys, indented, one document.
func printJSON<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .prettyPrinted]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}
