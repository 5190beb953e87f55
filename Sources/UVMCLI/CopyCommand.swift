import Archive
import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import NIOCore
import Synchronization
import Settings
import Wire

struct Copy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cp",
        abstract: "Copy files and folders between the host and a distribution.",
        discussion: """
            A path in a distribution is DISTRO:PATH (`:PATH` for the default distro); a relative PATH there is in the user's home, as with scp. Any other path is the host's (write ./a:b for a host file whose name has a colon). Exactly one side is a distribution.

            As cp: a DEST that is a folder receives the sources under their own names; otherwise DEST is the new name of the one source. Folders need -r, which copies symlinks as links; without -r a symlink source is followed. Modes and modification times are kept. New files in a distribution belong to its default user (or --user), new files on the host to you; -a keeps the numeric owners (on the host only as root) and setuid/setgid bits.

            `-` as the source reads a tar stream from stdin and unpacks it into DEST (a folder in a distribution); `-` as DEST writes a tar of the sources to stdout.

            Examples:
              uvm cp -r ./src debian:/home/me/      uvm cp debian:/var/log/dpkg.log .
              tar -C dir -c . | uvm cp - debian:/srv      uvm cp -r debian:/etc - | tar -t
            """)

    @Flag(name: [.short, .customShort("R"), .long], help: "Copy folders and everything in them.")
    var recursive = false

    @Flag(name: [.short, .long], help: "Keep numeric owners and setuid/setgid bits.")
    var archive = false

    @Option(name: [.short, .long], help: "User in the distribution: owner of new files, and whose home relative paths are in (default: its default user).")
    var user: String?

    @Flag(name: [.short, .long], help: "No progress on stderr.")
    var quiet = false

    @Argument(help: "SOURCE... DEST")
    var paths: [String] = []

    /// A path as the command line wrote it.
    enum Place: Equatable {
        case host(String)
        case guest(distro: String?, path: String)
        case stream  // "-"

        init(_ arg: String) {
            if arg == "-" { self = .stream; return }
            // DISTRO:PATH when the colon comes before any slash; ":PATH" is the default distro.
            if let colon = arg.firstIndex(of: ":"), !arg[..<colon].contains("/") {
                let name = String(arg[..<colon])
                self = .guest(distro: name.isEmpty ? nil : name, path: String(arg[arg.index(after: colon)...]))
            } else {
                self = .host(arg)
            }
        }
    }

    func validate() throws {
        guard paths.count >= 2 else { throw ValidationError("give at least one SOURCE and a DEST: uvm cp [-r] SOURCE... DEST") }
        let places = paths.map(Place.init)
        let sources = places.dropLast(), dest = places.last!
        let guestSources = sources.filter { if case .guest = $0 { true } else { false } }
        switch dest {
        case .guest:
            guard guestSources.isEmpty else { throw ValidationError("copying from one distribution to another is not supported: copy through the host") }
            if sources.contains(.stream) && sources.count > 1 { throw ValidationError("`-` (a tar on stdin) must be the only source") }
        case .host, .stream:
            guard guestSources.count == sources.count else {
                throw ValidationError(dest == .stream ? "with `-` as DEST, every source is DISTRO:PATH"
                    : "one side must be a distribution (DISTRO:PATH); to copy on the host, use cp")
            }
            let distros = Set(guestSources.map { if case .guest(let d, _) = $0 { d ?? "" } else { "" } })
            guard distros.count == 1 else { throw ValidationError("every source must be in the same distribution") }
        }
        for case .guest(let d, _) in places where d.map({ !validDistroName($0) }) ?? false {
            throw ValidationError("bad distro name '\(d!)': letters, digits, '-', '_' or '.', at most 16 bytes")
        }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let places = paths.map(Place.init)
        let result: CopyResult
        let progress = Progress(enabled: !quiet && isatty(2) == 1)
        if case .guest(let distro, let path) = places.last! {
            result = try copyIn(sources: places.dropLast().map { if case .host(let p) = $0 { p } else { "-" } },
                                distro: distro, destination: path, progress: progress)
        } else {
            let sources = places.dropLast().map { if case .guest(_, let p) = $0 { p } else { "" } }
            guard case .guest(let distro, _) = places[0] else { return }
            result = try copyOut(distro: distro, sources: sources, destination: places.last!, progress: progress)
        }
        progress.finish(result)
    }

    // MARK: host -> distro

    private func copyIn(sources: [String], distro: String?, destination: String, progress: Progress) throws -> CopyResult {
        let fromStdin = sources == ["-"]
        var resolved = sources
        var names: [String]? = nil
        if !fromStdin {
            // Checked before anything starts, so a typo costs no VM boot.
            names = []
            for (i, source) in sources.enumerated() {
                var st = stat()
                guard lstat(source, &st) == 0 else { throw CLIError("\(source): \(String(cString: strerror(errno)))") }
                if !recursive && (st.st_mode & S_IFMT == S_IFDIR || (st.st_mode & S_IFMT == S_IFLNK && isDirectory(source))) {
                    throw CLIError("\(source) is a folder: copy it with -r")
                }
                if CopyPaths.split(source) == nil {
                    // ".", ".." or "/": the folder under its real name (cp -r . DEST copies into DEST/NAME too).
                    guard let real = realpath(source, nil) else { throw CLIError("\(source): \(String(cString: strerror(errno)))") }
                    resolved[i] = String(cString: real)
                    free(real)
                    guard CopyPaths.split(resolved[i]) != nil else { throw CLIError("\(source): cannot copy the host's root folder") }
                }
                names!.append(CopyPaths.split(resolved[i])!.name)
            }
        }
        let request = CopyInRequest(distro: distro, destination: destination, names: names, user: user, keepOwners: archive)
        let conn = try DaemonConnection.connectOrLaunch(paths: .current())
        try conn.send(.json(.request, request.request))

        // The tar goes out on a thread of its own, only as far ahead as the guest acknowledges.
        let window = StdinWindow(size: Frame.stdinWindow)
        let failure = SendFailure()
        let recursive = recursive, toSend = resolved
        startThread {
            func send(_ bytes: UnsafeRawBufferPointer) throws {
                window.acquire(bytes.count)
                try conn.send(Frame(.stdin, ByteBuffer(bytes: bytes)))
                progress.add(bytes.count)
            }
            do {
                if fromStdin {
                    var buf = [UInt8](repeating: 0, count: 256 << 10)
                    while true {
                        let n = read(0, &buf, buf.count)
                        if n < 0 && errno == EINTR { continue }
                        if n < 0 { throw CLIError("reading stdin: \(String(cString: strerror(errno)))") }
                        if n == 0 { break }
                        try buf.withUnsafeBytes { try send(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
                    }
                } else {
                    let tar = TarWriter(bufferSize: 512 << 10) { try send($0) }
                    try CopyPaths.send(toSend, root: .host, recursive: recursive, to: tar)
                    try tar.finish()
                }
                try conn.send(Frame(.stdinEOF))
            } catch {
                // The guest keeps what arrived; a signal frame ends its side with an error.
                failure.set("\(error)")
                try? conn.send(.signal(SIGINT))
            }
        }
        while let frame = try conn.receive() {
            switch frame.kind {
            case .stdinAck: window.release(frame.ackedBytes ?? 0)
            case .progress: progress.line(frame.payload)
            case .response:
                if let message = failure.message { throw CLIError(message) }
                return try frame.decode(CopyResult.self)
            case .error:
                let e = try frame.decode(WireError.self)
                throw CLIError(failure.message ?? e.message)
            default: continue
            }
        }
        throw CLIError(failure.message ?? "uvmd closed the connection during the copy (see \(Paths.current().daemonLog))")
    }

    private func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR
    }

    // MARK: distro -> host

    private func copyOut(distro: String?, sources: [String], destination: Place, progress: Progress) throws -> CopyResult {
        var extractor: TarExtractor?
        if case .host(let dest) = destination {
            var names: [String] = []
            for s in sources {
                guard let n = CopyPaths.split(s) else { throw CLIError("\(s): name a file or folder in the distribution (not '/', '.' or '..')") }
                names.append(n.name)
            }
            var options = ExtractOptions()
            options.preserveOwnership = archive && geteuid() == 0
            if !archive { options.clearedModeBits = UInt32(S_ISUID | S_ISGID) }
            do {
                let placed = try CopyPaths.destination(dest, names: names, root: .host)
                options.topLevelNames = placed.names
                extractor = TarExtractor(destinationFD: placed.fd, options: options)
            } catch let e as ArchiveError {
                throw CLIError(e.description)
            }
        } else if isatty(1) == 1 {
            throw CLIError("`-` writes a tar to stdout, which is a terminal: redirect it (uvm cp … - > x.tar) or pipe it (| tar -x)")
        }
        let conn = try DaemonConnection.connectOrLaunch(paths: .current())
        try conn.send(.json(.request, CopyOutRequest(distro: distro, sources: sources, user: user, recursive: recursive).request))
        while let frame = try conn.receive() {
            switch frame.kind {
            case .stdout:
                if let extractor {
                    do {
                        try frame.payload.withUnsafeReadableBytes { try extractor.feed($0) }
                    } catch {
                        // What the guest sent does not unpack here (a full disk, a refused name).
                        throw CLIError("copying to \(destination): \(error)")
                    }
                } else if !writeAll(1, frame.payload) {
                    throw CLIError("writing stdout: \(String(cString: strerror(errno)))")
                }
                progress.add(frame.payload.readableBytes)
            case .progress: progress.line(frame.payload)
            case .response:
                let result = try frame.decode(CopyResult.self)
                do { try extractor?.finish() } catch { throw CLIError("copying to \(destination): \(error)") }
                return result
            case .error: throw CLIError(try frame.decode(WireError.self).message)
            default: continue
            }
        }
        throw CLIError("uvmd closed the connection during the copy (see \(Paths.current().daemonLog))")
    }
}

/// The first error of the sending thread, for the main thread to report.
private final class SendFailure: Sendable {
    private let first = Mutex<String?>(nil)
    func set(_ m: String) { first.withLock { if $0 == nil { $0 = m } } }
    var message: String? { first.withLock { $0 } }
}

/// Bytes so far and the rate, redrawn on one stderr line at most twice a second (a terminal only).
private final class Progress: @unchecked Sendable {
    let enabled: Bool
    private let lock = Mutex(())
    private var bytes = 0
    private var shown = false
    private let started = ContinuousClock.now
    private var lastDrawn = ContinuousClock.now

    init(enabled: Bool) { self.enabled = enabled }

    func add(_ n: Int) {
        guard enabled else { return }
        lock.withLock { _ in addLocked(n) }
    }

    private func addLocked(_ n: Int) {
        bytes += n
        let now = ContinuousClock.now
        guard now - lastDrawn >= .milliseconds(500) else { return }
        lastDrawn = now
        draw(final: false)
    }

    /// A line from uvmd (the VM booting) on its own line.
    func line(_ payload: ByteBuffer) {
        guard enabled else { return }
        lock.withLock { _ in
            if shown { writeAll(2, ByteBuffer(string: "\n")); shown = false }
            writeAll(2, payload, newline: true)
        }
    }

    func finish(_ result: CopyResult) {
        guard enabled else { return }
        lock.withLock { _ in
            bytes = Int(result.bytes)
            draw(final: true, entries: result.entries)
        }
    }

    private func draw(final: Bool, entries: Int? = nil) {
        let seconds = max(0.001, Double((ContinuousClock.now - started).components.attoseconds) / 1e18
                          + Double((ContinuousClock.now - started).components.seconds))
        let mib = Double(bytes) / 1048576
        var text = "\ruvm cp: \(format(mib)) MiB, \(format(mib / seconds)) MiB/s"
        if let entries { text += ", \(entries) entries" }
        text += final ? "\n" : "\u{1B}[K"
        writeAll(2, ByteBuffer(string: text))
        shown = !final
    }

    private func format(_ x: Double) -> String {
        let tenths = Int((x * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }
}
