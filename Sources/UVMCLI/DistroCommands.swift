import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CSyscalls
import Glibc
import NIOCore
import Settings
import Wire

/// A size such as 64G, 512M, 1T or plain bytes.
struct SizeArgument: ExpressibleByArgument {
    var bytes: UInt64
    init?(argument: String) {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var s = argument.uppercased()
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
        var factor: UInt64 = 1
        if let u = s.last, let f = units[u] { factor = f; s.removeLast() }
        guard let n = UInt64(s), n > 0, n <= UInt64.max / factor else { return nil }
        bytes = n * factor
    }
}

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Create a distribution from a root file system tarball (WSL's --import).",
        discussion: """
            FILE is a tar, tar.gz, tar.xz, tar.zst or tar.bz2 of a root file system (it must have /bin/sh and /etc/os-release), or - for stdin. Owners, modes, setuid bits, xattrs, file capabilities, hard links, devices and sparse files arrive exactly: the VM extracts it as root onto the new distribution's own disk, a sparse ext4 image in ~/.local/share/uvm/distros/NAME. A user with your name, uid and gid is created (password-less sudo) and becomes the distribution's default user. While it runs, the uncompressed tar is kept in ~/.local/share/uvm/spool (the VM reads it from there as a disk), so that folder's file system needs room for it.

            Example: uvm import work ./rootfs.tar.zst --size 32G
            """)

    @Argument(help: "Name of the new distribution (letters, digits, - _ ., at most 16).") var name: String
    @Argument(help: "The tarball, or - for stdin.") var file: String
    @Option(help: "Maximum size of its disk (sparse), e.g. 32G (default 64G).") var size: SizeArgument?
    @Flag(help: "Make it the default distribution.") var setDefault = false

    func run() throws {
        let info = try DistroTransfer.importTarball(file: file, request: ImportRequest(name: name, spool: "", sizeBytes: size?.bytes, setDefault: setDefault))
        print("imported \(info.name)\(info.prettyName.map { " (\($0))" } ?? "")\(info.isDefault ? ", the default distribution" : "")")
    }
}

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a distribution's root file system as a tarball (WSL's --export).",
        discussion: "FILE - writes to stdout. The format follows FILE's extension (.tar, .tar.gz, .tar.xz, .tar.zst) unless --format says. The distribution keeps running if it is; files changing meanwhile may be caught half-written.")

    enum Format: String, ExpressibleByArgument, CaseIterable {
        case tar, tarGz = "tar.gz", tarXz = "tar.xz", tarZst = "tar.zst"
        var compressor: [String]? {
            switch self {
            case .tar: nil
            case .tarGz: ["gzip", "-c"]
            case .tarXz: ["xz", "-T0", "-c"]
            case .tarZst: ["zstd", "-q", "-T0", "-c"]
            }
        }
    }

    @Argument(help: "The distribution.") var name: String
    @Argument(help: "Where to write, or - for stdout.") var file: String
    @Option(help: "tar, tar.gz, tar.xz or tar.zst (default: from FILE's name, else tar).") var format: Format?

    func run() throws {
        let chosen = format ?? Format.allCases.sorted { $0.rawValue.count > $1.rawValue.count }.first { file.hasSuffix(".\($0.rawValue)") } ?? .tar
        let result = try DistroTransfer.export(name: name, file: file, compressor: chosen.compressor)
        if file != "-" {
            printError("uvm: exported \(name) to \(file) (\(result.bytes >> 20) MiB of tar\(result.skipped > 0 ? ", \(result.skipped) sockets skipped" : ""))")
        }
    }
}

struct Unregister: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unregister",
        abstract: "Stop a distribution and delete it with its disk (WSL's --unregister). There is no undo.",
        discussion: "If it was the default chosen with `uvm default`, the default returns to the configured one (busybox unless uvm.conf says otherwise).")
    @Argument(help: "The distribution.") var name: String
    func run() throws {
        // What it did besides (stopped the instance, the default changed) is said on stderr.
        _ = try DaemonConnection.connectOrLaunch(paths: .current()).call(UnregisterRequest(name: name))
        print("unregistered \(name)")
    }
}

struct Default: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "default",
        abstract: "Show or set the default distribution (WSL's --set-default).",
        discussion: "The default is what `uvm`, `uvm shell` and `uvm exec` use without --distro. A defaultDistro in uvm.conf (or UVM_DEFAULT_DISTRO) wins over this.")
    @Argument(help: "The distribution to make the default; without it, print the default.") var name: String?
    func run() throws {
        let conn = try DaemonConnection.connectOrLaunch(paths: .current())
        if let name {
            _ = try conn.call(SetDefaultRequest(name: name))
        } else if let d = try conn.call(StatusRequest()).instances?.first(where: \.isDefault) {
            print(d.name)
        }
    }
}

struct Terminate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "terminate",
        abstract: "Stop one distribution's instance now (WSL's --terminate): its processes get SIGTERM, then SIGKILL after 5 s.")
    @Argument(help: "The distribution.") var name: String
    func run() throws {
        _ = try DaemonConnection.connectOrLaunch(paths: .current()).call(TerminateRequest(name: name))
    }
}

struct Manage: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "manage",
        abstract: "Change a distribution (WSL's --manage).",
        discussion: """
            --resize SIZE grows or shrinks its disk and file system (sparse: it takes only what is written); its instance is stopped first. A shrink needs room for the files already there.
            --compact gives the blocks its file system no longer uses back to the host (a trim in the VM, which starts if needed); the instance keeps running. Deleted files are given back as they go anyway (the disk is mounted with discard): this is for what that missed.
            """)
    @Argument(help: "The distribution.") var name: String
    @Option(help: "New maximum size of its disk, e.g. 128G.") var resize: SizeArgument?
    @Flag(help: "Give the disk's unused blocks back to the host.") var compact = false
    @OptionGroup var format: FormatOption

    func validate() throws {
        if resize == nil && !compact { throw ValidationError("nothing to do: say --resize SIZE or --compact") }
        if resize != nil && compact { throw ValidationError("--resize and --compact are separate steps: run one, then the other") }
    }

    func run() throws {
        let conn = try DaemonConnection.connectOrLaunch(paths: .current())
        if compact {
            let r = try conn.call(CompactRequest(name: name))
            if format.format == .json { return try printJSON(r) }
            print("\(r.name): \(formatMiB(r.allocatedBeforeBytes)) -> \(formatMiB(r.allocatedAfterBytes)) on the host (disk of at most \(formatMiB(r.sizeBytes)); the file system trimmed \(formatMiB(r.trimmedBytes)) of free space)")
            return
        }
        let info = try conn.call(ResizeRequest(name: name, sizeBytes: resize!.bytes))
        if format.format == .json { return try printJSON(info) }
        print("\(info.name): disk of at most \(info.sizeBytes >> 20) MiB, \(info.allocatedBytes >> 20) MiB used on the host")
    }
}

struct Install: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "install",
        abstract: "Build a distribution from one of uvm's recipes and import it (WSL's --install).",
        discussion: """
            `uvm install debian` builds Debian 12 with mmdebstrap from the Debian mirror your apt uses (its sources and proxy are copied in, so apt-get works inside), caches the root file system under ~/.cache/uvm/rootfs (a second install takes seconds), and imports it. `uvm install --list` shows the recipes.
            """)
    @Argument(help: "The recipe (see --list).") var recipe: String?
    @Option(help: "Name of the new distribution (default: the recipe's name).") var name: String?
    @Option(help: "Maximum size of its disk (sparse), e.g. 32G (default 64G).") var size: SizeArgument?
    @Flag(help: "Make it the default distribution.") var setDefault = false
    @Flag(help: "List the recipes.") var list = false

    func run() throws {
        let recipes = try Recipes.available()
        if list || recipe == nil {
            for r in recipes { print("\(r.name)\t\(r.summary)") }
            if recipe == nil && !list { throw ValidationError("which recipe? (uvm install --list)") }
            return
        }
        guard let chosen = recipes.first(where: { $0.name == recipe }) else {
            throw CLIError("there is no recipe '\(recipe!)' (uvm install --list shows: \(recipes.map(\.name).joined(separator: ", ")))")
        }
        let tarball = try chosen.build()
        let request = ImportRequest(name: name ?? chosen.name, spool: "", sizeBytes: size?.bytes, setDefault: setDefault)
        // A recipe may leave an ext4 image of the same root next to the tarball: copying it is
        // faster than extracting the tarball in the VM.
        let image = tarball.hasSuffix(".tar.zst") ? String(tarball.dropLast(8)) + ".ext4" : ""
        let info = access(image, R_OK) == 0
            ? try DistroTransfer.installImage(image, request: request)
            : try DistroTransfer.importTarball(file: tarball, request: request)
        print("installed \(info.name)\(info.prettyName.map { " (\($0))" } ?? "")\(info.isDefault ? ", the default distribution" : "")")
    }
}

/// The recipes in images/ that build a distribution's root file system (`images/NAME/build.sh`
/// with a `# uvm-install: SUMMARY` line: progress on stderr, the tarball's path on stdout).
struct Recipes {
    struct Recipe {
        var name: String
        var script: String
        var summary: String

        func build() throws -> String {
            var fds: [Int32] = [-1, -1]
            guard uvm_pipe_cloexec(&fds) == 0 else { throw CLIError("pipe: \(String(cString: strerror(errno)))") }
            let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/bash"), strdup(script), nil]
            defer { argv.forEach { free($0) } }
            // Its progress goes straight to our stderr; its stdout names the tarball.
            let pid = uvm_spawn_with_fds("/bin/bash", argv, 0, fds[1], 2)
            close(fds[1])
            guard pid > 0 else { close(fds[0]); throw CLIError("cannot run \(script): \(String(cString: strerror(errno)))") }
            var out = [UInt8]()
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = read(fds[0], &buf, buf.count)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                out += buf[0..<n]
            }
            close(fds[0])
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            guard status == 0 else { throw CLIError("the \(name) recipe failed (its messages are above)") }
            guard let path = String(decoding: out, as: UTF8.self).split(separator: "\n").last.map(String.init), access(path, R_OK) == 0 else {
                throw CLIError("the \(name) recipe did not name a tarball it built")
            }
            return path
        }
    }

    /// UVM_RECIPES, else images/ next to the build (a checkout), else share/uvm/recipes (installed).
    static func directory() -> String? {
        if let d = ProcessInfo.processInfo.environment["UVM_RECIPES"], !d.isEmpty { return d }
        let exe = DaemonConnection.siblingExecutable("uvm")
        var dir = String(exe[..<(exe.lastIndex(of: "/") ?? exe.startIndex)])
        for _ in 0..<4 {
            if access("\(dir)/images", F_OK) == 0 { return "\(dir)/images" }
            if access("\(dir)/share/uvm/recipes", F_OK) == 0 { return "\(dir)/share/uvm/recipes" }
            dir = String(dir[..<(dir.lastIndex(of: "/") ?? dir.startIndex)])
        }
        return nil
    }

    static func available() throws -> [Recipe] {
        guard let dir = directory() else { throw CLIError("uvm's recipes (images/) are not found: set UVM_RECIPES to a uvm checkout's images folder") }
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
        return names.compactMap { n -> Recipe? in
            // A recipe `uvm install` offers says so, and what it builds, in a `# uvm-install:` line.
            let script = "\(dir)/\(n)/build.sh"
            guard let text = try? String(contentsOfFile: script, encoding: .utf8),
                  let line = text.split(separator: "\n").first(where: { $0.hasPrefix("# uvm-install:") }) else { return nil }
            return Recipe(name: n, script: script, summary: String(line.dropFirst("# uvm-install:".count).drop(while: { $0 == " " })))
        }
    }
}
