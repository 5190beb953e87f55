#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CSyscalls
import Glibc
import Synchronization
import NIOCore
import Settings
import Wire

/// A blocking connection to uvmd. The CLI is short-lived and mostly copies bytes, so plain
/// threads and blocking I/O keep it small and quick to start, and give backpressure for free.
final class DaemonConnection: @unchecked Sendable {
    let fd: Int32
    private let writeLock = Mutex(())
    private var buffer = ByteBuffer()

    private init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    static func connect(path: String) -> DaemonConnection? {
        var err: Int32 = 0
        return connect(path: path, errno: &err)
    }

    /// `errno` says why when it returns nil.
    static func connect(path: String, errno err: inout Int32) -> DaemonConnection? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { close(fd); return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { err = errno; close(fd); return nil }
        return DaemonConnection(fd: fd)
    }

    /// Connects to uvmd, starting it first when it is not running (`uvm` never needs a separate
    /// start step).
    static func connectOrLaunch(paths: Paths) throws -> DaemonConnection {
        var err: Int32 = 0
        if let c = connect(path: paths.socket, errno: &err) { return c }
        // Another user's uvmd (its socket and state are 0600/0700): starting one of ours there
        // could not work either.
        if err == EACCES || err == EPERM {
            throw CLIError("cannot connect to \(paths.socket): \(String(cString: strerror(err))); "
                + "it belongs to another user (each user runs their own uvmd: check UVM_SOCKET and UVM_HOME)")
        }
        // What uvmd logs from here on is about this start.
        var st = stat()
        let logStart = stat(paths.daemonLog, &st) == 0 ? Int(st.st_size) : 0
        var pid = try launchDaemon(paths: paths)
        let start = Date()
        var lostRace = false
        // 30 s for a start; longer while another uvmd holds the lock, which may be one that is
        // exiting (SIGTERM, a restart) and stopping its VM first (bounded at about a minute).
        while Date() < start.addingTimeInterval(lostRace ? 120 : 30) {
            if let c = connect(path: paths.socket) { return c }
            // uvmd refused to start (a bad uvm.conf, say): its last words say why. One that
            // found the lock taken lost a race with another start (`uvm` run several times at
            // once) or with an exiting uvmd: wait for the winner to listen, or to go.
            var status: Int32 = 0
            if !lostRace, waitpid(pid, &status, WNOHANG) == pid {
                if let c = connect(path: paths.socket) { return c }
                if status & 0x7f == 0, (status >> 8) & 0xff == Paths.daemonAlreadyRunningStatus {
                    lostRace = true
                    continue
                }
                throw CLIError(lastLogLine(paths.daemonLog, from: logStart) ?? "uvmd exited at start; see \(paths.daemonLog)")
            }
            // The lock's holder has gone without listening (it was exiting): start the next one.
            if lostRace && !lockHeld(paths.daemonLock) {
                lostRace = false
                pid = try launchDaemon(paths: paths)
            }
            usleep(20_000)
        }
        throw CLIError("uvmd did not start within \(lostRace ? 120 : 30) s; see \(paths.daemonLog)")
    }

    /// Whether a uvmd holds its lock (it takes it exclusively for its lifetime).
    static func lockHeld(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK
    }

    /// The last non-empty line written to `path` after `offset`, with uvmd's "uvmd: cannot start: " turned into "uvm: ".
    static func lastLogLine(_ path: String, from offset: Int) -> String? {
        guard let data = FileManager.default.contents(atPath: path), data.count > offset else { return nil }
        let text = String(decoding: data[offset...], as: UTF8.self)
        guard let line = text.split(separator: "\n").last(where: { !$0.allSatisfy(\.isWhitespace) }) else { return nil }
        return line.hasPrefix("uvmd: cannot start: ") ? "uvm: " + line.dropFirst("uvmd: cannot start: ".count) : String(line)
    }

    @discardableResult
    static func launchDaemon(paths: Paths) throws -> pid_t {
        let uvmd = ProcessInfo.processInfo.environment["UVMD_PATH"] ?? siblingExecutable("uvmd")
        guard access(uvmd, X_OK) == 0 else {
            throw CLIError("cannot start uvmd: \(uvmd) is missing (build it with `make build`, or set UVMD_PATH)")
        }
        try FileManager.default.createDirectory(atPath: paths.stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // Detached: its own session, stdio to the log, so it outlives this command.
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(uvmd), strdup("serve"), nil]
        defer { argv.forEach { free($0) } }
        let pid = uvm_spawn_detached(uvmd, argv, paths.daemonLog)
        guard pid > 0 else {
            throw CLIError("cannot start \(uvmd): \(String(cString: strerror(errno)))")
        }
        return pid
    }

    static func siblingExecutable(_ name: String) -> String {
        let me = Paths.executablePath() ?? CommandLine.arguments[0]
        guard let slash = me.lastIndex(of: "/") else { return name }
        return String(me[...slash]) + name
    }

    func send(_ frame: Frame) throws {
        var out = ByteBuffer()
        out.reserveCapacity(Frame.headerSize + frame.payload.readableBytes)
        out.writeFrame(frame)
        try writeLock.withLock { _ in try sendAll(out) }
    }

    private func sendAll(_ out: ByteBuffer) throws {
        try out.withUnsafeReadableBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + off, raw.count - off, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw CLIError("lost the connection to uvmd: \(String(cString: strerror(errno)))")
                }
                off += n
            }
        }
    }

    /// The next frame from uvmd; nil when it closed the connection.
    func receive() throws -> Frame? {
        while true {
            if let f = try buffer.readFrame() { return f }
            buffer.discardReadBytes()
            var chunk = [UInt8](repeating: 0, count: 256 << 10)
            let n = recv(fd, &chunk, chunk.count, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw CLIError("lost the connection to uvmd: \(String(cString: strerror(errno)))")
            }
            if n == 0 { return nil }
            buffer.writeBytes(chunk[0..<n])
        }
    }

    /// A request whose answer is one `response` frame (progress lines go to stderr).
    func call<C: DaemonCall>(_ call: C, showProgress: Bool = true) throws -> C.Response {
        try send(.json(.request, call.request))
        while let frame = try receive() {
            switch frame.kind {
            case .response: return try frame.decode(C.Response.self)
            case .error: throw CLIError(try frame.decode(WireError.self).message)
            case .progress: if showProgress { writeAll(2, frame.payload, newline: true) }
            default: continue
            }
        }
        throw CLIError("uvmd closed the connection without answering (see its log)")
    }
}

struct CLIError: Error, CustomStringConvertible {
    var message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// Writes a buffer fully to a file descriptor (stdout/stderr); false if the reader is gone.
@discardableResult
func writeAll(_ fd: Int32, _ buffer: ByteBuffer, newline: Bool = false) -> Bool {
    var ok = true
    buffer.withUnsafeReadableBytes { raw in
        var off = 0
        while off < raw.count {
            let n = write(fd, raw.baseAddress! + off, raw.count - off)
            if n < 0 {
                if errno == EINTR { continue }
                ok = false
                return
            }
            off += n
        }
    }
    if newline && ok { _ = write(fd, "\n", 1) }
    return ok
}
