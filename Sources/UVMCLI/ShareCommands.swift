import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Settings
import Wire

struct Share: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "share",
        abstract: "Show host folders inside every distro (at /mnt/host/NAME), over 9P.",
        discussion: """
            Your home folder is shared as /mnt/host/home unless UVM_HOME_SHARE=off (or a path to share instead). Shares added here are kept across restarts and appear or go at once in a running VM. A command started from a host folder inside a share runs in the same folder in the guest.
            """,
        subcommands: [Add.self, List.self, Remove.self])

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add",
            abstract: "Share a host folder as /mnt/host/NAME.",
            discussion: "Example: uvm share add src ~/src --read-only")
        @Argument(help: "Name in the guest (letters, digits, '-', '_', '.').") var name: String
        @Argument(help: "Host folder.") var path: String
        @Flag(help: "Refuse every change from the guest (EROFS).") var readOnly = false
        @Flag(help: "Keep guest owners and modes (chown, chmod) in user.* xattrs, as WSL's metadata option does.") var metadata = false
        @Option(help: .hidden) var serverCommand: String?
        @Flag(help: .hidden) var viaPort = false
        @OptionGroup var format: FormatOption

        func run() throws {
            let absolute = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
            let spec = ShareSpec(name: name, path: absolute, readOnly: readOnly, metadata: metadata, serverCommand: serverCommand,
                                 viaPort: viaPort ? true : nil)
            let status = try DaemonConnection.connectOrLaunch(paths: .current()).call(ShareAddRequest(share: spec))
            try printShares([status], format.format)
            // Recorded, but the running VM could not mount it: say so, and fail.
            if status.state.hasPrefix("failed") {
                throw CLIError("share \(name) was added but not mounted: \(status.state.dropFirst("failed: ".count)) (uvm share remove \(name) to drop it)")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the shares, where they appear, and whether they are mounted.")
        @OptionGroup var format: FormatOption
        func run() throws {
            let shares = try DaemonConnection.connectOrLaunch(paths: .current()).call(ShareListRequest())
            try printShares(shares, format.format)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove", abstract: "Stop sharing a folder (it is unmounted in a running VM at once).")
        @Argument(help: "The share's name.") var name: String
        func run() throws {
            _ = try DaemonConnection.connectOrLaunch(paths: .current())
                .call(ShareRemoveRequest(name: name))
        }
    }
}

func printShares(_ shares: [ShareStatus], _ format: FormatOption.Format) throws {
    if format == .json {
        return try printJSON(shares)
    }
    for s in shares {
        var flags = [s.source]
        if s.share.readOnly { flags.append("read-only") }
        if s.share.metadata { flags.append("metadata") }
        print("\(s.share.name)\t\(s.share.path) -> \(s.guestPath)\t(\(flags.joined(separator: ", ")))\t\(s.state)")
    }
}
