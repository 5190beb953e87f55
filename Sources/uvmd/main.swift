import ArgumentParser
import Config
import Daemon
import Foundation
import Logging
import Settings

@main
struct UVMD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uvmd",
        abstract: "The uvm host service: boots the utility VM on demand and serves `uvm`.",
        discussion: """
            `uvm` starts uvmd by itself when it is not running; there is no need to start it by hand. It listens on $UVM_HOME/state/uvmd.sock (or $XDG_STATE_HOME/uvm/uvmd.sock), mode 0600, or on the socket systemd passes it (uvmd.socket). It logs to stderr.
            """,
        subcommands: [Serve.self, DoctorCommand.self, ConfigCommand.self],
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
        let loaded: LoadedSettings
        do {
            loaded = try Config.load()
        } catch {
            // One line the CLI that launched us shows to the user (it reads our log).
            FileHandle.standardError.write(Data("uvmd: cannot start: \(error)\n".utf8))
            throw ExitCode(78)  // EX_CONFIG
        }
        do {
            try await UVMDaemon(settings: loaded.settings, logger: Logger(label: "uvmd")).run()
        } catch let e as UVMDaemon.StartError {
            FileHandle.standardError.write(Data("uvmd: cannot start: \(e.description)\n".utf8))
            // Tells a `uvm` that launched us that another uvmd has the lock and is about to
            // listen: it waits for that one instead of failing.
            if case .alreadyRunning = e { throw ExitCode(Paths.daemonAlreadyRunningStatus) }
            throw ExitCode(71)  // EX_OSERR
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

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "The settings in effect (what `uvm config` runs).",
        subcommands: [Show.self], defaultSubcommand: Show.self)

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print every setting, its value and where it came from (default, file:line, environment).")

        @Option(help: "Output format: text or json.")
        var format: String = "text"

        func run() throws {
            let loaded: LoadedSettings
            do {
                loaded = try Config.load()
            } catch {
                FileHandle.standardError.write(Data("uvm: \(error)\n".utf8))
                throw ExitCode(125)
            }
            if format == "json" {
                let e = JSONEncoder()
                e.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try e.encode(Config.report(loaded)), as: UTF8.self))
            } else {
                print(Config.describe(loaded), terminator: "")
            }
        }
    }
}
