import ArgumentParser
import Daemon
import Foundation
import Logging

@main
struct UVMD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uvmd",
        abstract: "The uvm host service: boots the utility VM on demand and serves `uvm`.",
        discussion: """
            `uvm` starts uvmd by itself when it is not running; there is no need to start it by hand. It listens on $UVM_HOME/state/uvmd.sock (or $XDG_STATE_HOME/uvm/uvmd.sock), mode 0600, or on the socket systemd passes it (uvmd.socket). It logs to stderr.
            """,
        subcommands: [Serve.self, DoctorCommand.self],
        defaultSubcommand: Serve.self)
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Serve `uvm` (the default).")

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: Logger.Level = .info

    func run() async throws {
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        do {
            try await UVMDaemon(logger: Logger(label: "uvmd")).run()
        } catch let e as UVMDaemon.StartError {
            throw ValidationError(e.description)
        }
    }
}

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "doctor", abstract: "Check the host (what `uvm doctor` runs).")

    @Option(help: "Output format: text or json.")
    var format: String = "text"

    func run() async throws {
        let checks = await Doctor().run()
        if format == "json" {
            let e = JSONEncoder()
            e.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try e.encode(checks), as: UTF8.self))
        } else {
            for c in checks {
                print("\(c.ok ? "ok  " : "FAIL") \(c.name.padding(toLength: 12, withPad: " ", startingAt: 0)) \(c.detail)")
                if let fix = c.fix, !c.ok { print("     \(String(repeating: " ", count: 12)) fix: \(fix)") }
            }
        }
        if checks.contains(where: { !$0.ok }) { throw ExitCode(1) }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
