#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Synchronization
import NIOCore
import Settings
import Wire

/// Runs one exec/shell session: our stdio and signals to the guest process, its output and exit
/// status back. Returns the status `uvm` should exit with.
enum SessionRunner {
    /// Exit status for failures of uvm itself (not of the command), as `docker run` does.
    static let ownFailure: Int32 = 125

    static func run(_ exec: ExecRequest, paths: Paths) throws -> Int32 {
        let started = SessionTrace.now()
        // Signals are taken by one thread with sigwait(); block them before any thread starts.
        var forwarded = sigset_t()
        sigemptyset(&forwarded)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH, SIGUSR1, SIGUSR2] { sigaddset(&forwarded, s) }
        pthread_sigmask(SIG_BLOCK, &forwarded, nil)
        signal(SIGPIPE, SIG_IGN)

        let conn = try DaemonConnection.connectOrLaunch(paths: paths)
        let connected = SessionTrace.now()
        var request = exec
        // UVM_TRACE=1: where this session's time went, as one JSON line on stderr (make bench).
        let tracing = getenv("UVM_TRACE").map { String(cString: $0) == "1" } ?? false
        if tracing { request.trace = true }
        let terminal = exec.tty ? RawTerminal(fd: 0) : nil
        if let size = terminal?.windowSize { (request.rows, request.cols) = (size.rows, size.cols) }
        // getcwd is the physical path, as share roots are kept: uvmd maps it into a share.
        if request.cwd == nil { request.hostCwd = FileManager.default.currentDirectoryPath }
        // For the host programs `uvm-host` may run in this session (uvmd keeps it from the guest).
        var hostEnv: [String] = []
        var entry = environ
        while let e = entry.pointee {
            hostEnv.append(String(cString: e))
            entry += 1
        }
        request.hostEnv = hostEnv
        try conn.send(.json(.request, DaemonRequest.exec(request)))
        terminal?.enterRawMode()
        defer { terminal?.restore() }

        // Stdin goes only as far ahead of the process as the guest acknowledges: the socket never
        // fills with it, so a signal frame (sent by the thread below) never waits behind it.
        let window = StdinWindow(size: Frame.stdinWindow)
        startThread {
            var buf = [UInt8](repeating: 0, count: 128 << 10)
            while true {
                let n = read(0, &buf, buf.count)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    try? conn.send(Frame(.stdinEOF))
                    return
                }
                window.acquire(n)
                do { try conn.send(Frame(.stdin, ByteBuffer(bytes: buf[0..<n]))) } catch { return }
            }
        }
        let waited = forwarded
        startThread {
            var set = waited
            while true {
                var sig: Int32 = 0
                guard sigwait(&set, &sig) == 0 else { continue }
                if sig == SIGWINCH {
                    if let ws = terminal?.windowSize { try? conn.send(.resize(rows: ws.rows, cols: ws.cols)) }
                } else {
                    try? conn.send(.signal(sig))
                }
            }
        }

        let showProgress = isatty(2) == 1
        var stdoutOpen = true
        while let frame = try conn.receive() {
            switch frame.kind {
            case .stdout:
                // A closed stdout (`uvm exec ... | head`) must not stop stderr or the exit status.
                if stdoutOpen { stdoutOpen = writeAll(1, frame.payload) }
            case .stderr:
                writeAll(2, frame.payload)
            case .progress:
                if showProgress { writeAll(2, frame.payload, newline: true) }
            case .stdinAck:
                window.release(frame.ackedBytes ?? 0)
            case .exit:
                let status = try frame.decode(ExitStatus.self)
                if tracing {
                    var trace = status.trace ?? [:]
                    trace[SessionTrace.cliConnect] = connected - started
                    trace[SessionTrace.cliSession] = SessionTrace.now() - connected
                    if let json = try? JSONEncoder().encode(trace) {
                        var line = ByteBuffer(bytes: Array("uvm-trace: ".utf8) + Array(json))
                        line.writeString("\n")
                        writeAll(2, line)
                    }
                }
                return status.shellStatus
            case .error:
                let e = try frame.decode(WireError.self)
                terminal?.restore()
                printError(e.message)
                return ownFailure
            default:
                continue
            }
        }
        terminal?.restore()
        printError("uvm: uvmd closed the connection before the command finished (see \(paths.daemonLog))")
        return ownFailure
    }
}

/// Stdin bytes sent and not yet acknowledged by the guest, at most `size` (one chunk may exceed
/// it when nothing is outstanding). A blocking wait: the CLI's stdin has a plain thread of its own.
final class StdinWindow: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var outstanding = 0  // guarded by lock
    let size: Int

    init(size: Int) {
        self.size = size
        pthread_mutex_init(lock, nil)
        pthread_cond_init(changed, nil)
    }

    deinit {
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(lock)
        lock.deallocate()
        changed.deallocate()
    }

    /// Waits until `n` more bytes fit, then counts them as sent.
    func acquire(_ n: Int) {
        pthread_mutex_lock(lock)
        while outstanding > 0 && outstanding + n > size { pthread_cond_wait(changed, lock) }
        outstanding += n
        pthread_mutex_unlock(lock)
    }

    func release(_ n: Int) {
        pthread_mutex_lock(lock)
        outstanding = max(0, outstanding - n)
        pthread_cond_signal(changed)
        pthread_mutex_unlock(lock)
    }
}

/// A detached thread (Foundation's Thread is not in FoundationEssentials).
func startThread(_ body: @escaping @Sendable () -> Void) {
    final class Body { let run: @Sendable () -> Void; init(_ r: @escaping @Sendable () -> Void) { run = r } }
    var thread = pthread_t()
    let arg = Unmanaged.passRetained(Body(body)).toOpaque()
    let rc = pthread_create(&thread, nil, { arg in
        Unmanaged<Body>.fromOpaque(arg!).takeRetainedValue().run()
        return nil
    }, arg)
    if rc == 0 { pthread_detach(thread) }
}

func printError(_ message: String) {
    let line = message.hasPrefix("uvm") ? message : "uvm: \(message)"
    var bytes = ByteBuffer(string: line)
    bytes.writeString("\n")
    writeAll(2, bytes)
}

/// The host terminal in raw mode for an interactive session, restored on every way out.
final class RawTerminal: Sendable {
    let fd: Int32
    private let saved = Mutex<termios?>(nil)

    init?(fd: Int32) {
        guard isatty(fd) == 1 else { return nil }
        self.fd = fd
    }

    var windowSize: (rows: UInt16, cols: UInt16)? {
        var ws = winsize()
        guard ioctl(1, UInt(TIOCGWINSZ), &ws) == 0 || ioctl(fd, UInt(TIOCGWINSZ), &ws) == 0, ws.ws_row > 0 else { return nil }
        return (ws.ws_row, ws.ws_col)
    }

    func enterRawMode() {
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return }
        saved.withLock { $0 = t }
        cfmakeraw(&t)
        tcsetattr(fd, TCSANOW, &t)
    }

    func restore() {
        guard var t = saved.withLock({ s -> termios? in defer { s = nil }; return s }) else { return }
        tcsetattr(fd, TCSANOW, &t)
    }
}
