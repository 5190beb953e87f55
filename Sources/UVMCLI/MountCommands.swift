import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CSyscalls
import Glibc
import HostMount
import Settings
import Wire

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Show a distribution's files in a host folder (FUSE), until `uvm unmount`.",
        discussion: """
            The distribution's root appears at DIR (an empty folder you own), read and written as the distribution's default user (or --user): files you create there belong to that user inside, and that user's files show as yours on the host. No root is needed on the host (libfuse uses the setuid fusermount3 of Debian's fuse3 package).

            Using the mount starts the VM and the distribution if they are not running; an idle mount does not keep them running (the VM stops as usual when idle). If the VM stops while files are open, their operations fail with EIO; later ones start it again.

            `uvm mount` returns once the folder is mounted and serves it in the background (its log: the state folder's mount.log); --foreground keeps it attached. Example: uvm mount debian ~/debian && ls ~/debian/etc; uvm unmount ~/debian
            """)

    @Argument(help: "The distribution (see `uvm list`).")
    var distro: String

    @Argument(help: "An empty folder to show it in.")
    var directory: String

    @Option(name: [.short, .long], help: "Act as this user of the distribution (name or uid; default: its default user).")
    var user: String?

    @Flag(help: "Stay in the foreground until unmounted (or interrupted), instead of going to the background once mounted.")
    var foreground = false

    /// The background process tells its parent on this descriptor that it mounted, or why not.
    @Option(help: .hidden)
    var readyFd: Int32?

    func validate() throws {
        guard validDistroName(distro) else { throw ValidationError("'\(distro)' is not a distribution name (see `uvm list`)") }
    }

    func run() throws {
        let dir = absolutePath(directory)
        try checkMountPoint(dir)
        let paths = Paths.current()
        if foreground || readyFd != nil {
            var failure: String? = nil
            let request = FilesRequest(distro: distro, user: user)
            let status = HostMount.run(request: request, directory: dir, connectToDaemon: {
                let conn = try DaemonConnection.connectOrLaunch(paths: paths)
                let fd = dup(conn.fd)
                guard fd >= 0 else { throw CLIError("dup: \(String(cString: strerror(errno)))") }
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                return fd
            }, ready: { message in
                failure = message
                if let fd = readyFd {
                    let text = message ?? "ok"
                    _ = text.withCString { write(fd, $0, strlen($0)) }
                    close(fd)
                }
            })
            if let failure { throw CLIError("uvm mount: \(failure)") }
            throw ExitCode(status)
        }
        // In the background, the way sshfs does it, but without fork() in a threaded process: a
        // new process of our own, which says on a pipe whether it mounted.
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw CLIError("pipe: \(String(cString: strerror(errno)))") }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        let me = Paths.executablePath() ?? CommandLine.arguments[0]
        try FileManager.default.createDirectory(atPath: paths.stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        var args = [me, "mount", "--ready-fd", "3", distro, dir]
        if let user { args += ["--user", user] }
        let cargs = args.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        let pid = uvm_spawn_detached_fd3(me, cargs, "\(paths.stateDir)/mount.log", fds[1])
        close(fds[1])
        defer { close(fds[0]) }
        guard pid > 0 else { throw CLIError("cannot start \(me): \(String(cString: strerror(errno)))") }
        var answer = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while answer.count < 64 << 10 {
            let n = read(fds[0], &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            answer += buf[0..<n]
        }
        let text = String(decoding: answer, as: UTF8.self)
        if text == "ok" { return }
        // Reaped by the kernel once it exits: it is in a session of its own, not our child for long.
        var st: Int32 = 0
        _ = waitpid(pid, &st, WNOHANG)
        throw CLIError(text.isEmpty ? "uvm mount: the mount process ended before mounting (see \(paths.stateDir)/mount.log)" : "uvm mount: \(text)")
    }
}

struct Unmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount a folder that `uvm mount` mounted (its background process then exits).",
        discussion: "Example: uvm unmount ~/debian")

    @Argument(help: "The folder given to `uvm mount`.")
    var directory: String

    func run() throws {
        let dir = absolutePath(directory)
        guard let entry = MountTable.entry(at: dir) else {
            throw CLIError("uvm unmount: \(dir) is not a mount point")
        }
        guard entry.type == "fuse.uvm" else {
            throw CLIError("uvm unmount: \(dir) is a \(entry.type) mount, not one of `uvm mount`")
        }
        if geteuid() == 0 {
            guard umount2(dir, 0) == 0 else { throw CLIError("uvm unmount: \(dir): \(String(cString: strerror(errno)))") }
            return
        }
        let candidates: [String] = ["/usr/bin/fusermount3", "/bin/fusermount3"]
        guard let fusermount = candidates.first(where: { access($0, X_OK) == 0 }) else {
            throw CLIError("uvm unmount: fusermount3 is missing (Debian: apt-get install fuse3)")
        }
        let argv: [String] = [fusermount, "-u", "-q", dir]
        let args = argv.map { strdup($0) } + [nil]
        defer { args.forEach { free($0) } }
        let pid = uvm_spawn_with_fds(fusermount, args, -1, 1, 2)
        guard pid > 0 else { throw CLIError("uvm unmount: cannot run \(fusermount): \(String(cString: strerror(errno)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        guard status == 0 else { throw CLIError("uvm unmount: \(fusermount) -u \(dir) failed (is a file still open there?)") }
    }
}

/// An absolute path without symlinks resolved: a dead FUSE mount cannot be stat'ed.
func absolutePath(_ path: String) -> String {
    let joined = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    var parts: [Substring] = []
    for p in joined.split(separator: "/") {
        if p == "." { continue }
        if p == ".." { _ = parts.popLast(); continue }
        parts.append(p)
    }
    return "/" + parts.joined(separator: "/")
}

/// An empty folder of ours, not mounted on: the only kind `uvm mount` takes.
func checkMountPoint(_ dir: String) throws {
    var st = stat()
    guard stat(dir, &st) == 0 else {
        throw CLIError("uvm mount: \(dir): \(String(cString: strerror(errno))) (make an empty folder for it first)")
    }
    guard st.st_mode & S_IFMT == S_IFDIR else { throw CLIError("uvm mount: \(dir) is not a folder") }
    if MountTable.entry(at: dir) != nil { throw CLIError("uvm mount: \(dir) is already a mount point (`uvm unmount \(dir)`?)") }
    guard let d = opendir(dir) else { throw CLIError("uvm mount: \(dir): \(String(cString: strerror(errno)))") }
    defer { closedir(d) }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name != "." && name != ".." { throw CLIError("uvm mount: \(dir) is not empty (give an empty folder)") }
    }
}

/// /proc/self/mountinfo, read for one mount point.
enum MountTable {
    struct Entry { var mountPoint: String; var type: String }

    static func entry(at dir: String) -> Entry? {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        var found: Entry? = nil
        for line in text.split(separator: "\n") {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
            let f = line.split(separator: " ")
            guard f.count > 6, let dash = f.firstIndex(of: "-"), dash + 1 < f.count else { continue }
            if unescape(f[4]) == dir { found = Entry(mountPoint: dir, type: String(f[dash + 1])) }  // the last one is on top
        }
        return found
    }

    /// mountinfo writes space, tab, newline and backslash as \\ooo.
    static func unescape(_ s: Substring) -> String {
        var out = [UInt8]()
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[(i + 1)..<min(i + 4, b.count)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
