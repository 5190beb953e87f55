import CSyscalls
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import NIOCore
import Synchronization
import Wire

/// Interop in the guest. Where the host turned it on ([interop] enabled), each exec session gets
/// a socket of its own (abstract, named in UVM_INTEROP). `uvm-host` connects to it and hands over
/// its stdin/stdout/stderr with the program to run; the agent checks the caller descends from the
/// session's process (WSL's per-session socket: a process that left its session, or one the
/// instance's init started, is refused), then asks uvmd on the session's stream (`hostRun`) and
/// serves the program's stdio on the `interopAttach` stream uvmd opens for it.
final class InteropListener: @unchecked Sendable {
    let name: String
    private let fd: Int32
    private let sessionPID = Atomic<Int32>(0)
    /// Connections being received (each on a thread, 5 s at most): a flood is cut off here.
    private let receiving = Atomic<Int>(0)
    private let outbound: NIOAsyncChannelOutboundWriter<Frame>

    /// Where the command is found; /run/uvm/interop (xdg-open) first while interop is on.
    static let binDirectory = "/run/uvm/bin"
    static let overridesDirectory = "/run/uvm/interop"

    init(outbound: NIOAsyncChannelOutboundWriter<Frame>) throws {
        name = "uvm-interop-" + randomHex(16)
        fd = uvm_interop_listen(name)
        guard fd >= 0 else { throw WireError(.internalError, "interop socket: \(String(cString: strerror(errno)))") }
        self.outbound = outbound
    }

    /// Accepts commands once the session's process runs.
    func start(sessionPID pid: pid_t) {
        sessionPID.store(pid, ordering: .releasing)
        startThread { [self] in
            while true {
                let c = uvm_interop_accept(fd)
                if c < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return  // shut down: the session is over
                }
                guard receiving.add(1, ordering: .acquiringAndReleasing).newValue <= 16 else {
                    receiving.subtract(1, ordering: .acquiringAndReleasing)
                    Glibc.close(c)
                    continue
                }
                startThread { [self] in
                    self.serve(c)
                    receiving.subtract(1, ordering: .acquiringAndReleasing)
                }
            }
        }
    }

    /// The session is over: no new commands; those waiting for a program are told.
    func close() {
        shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
        for p in InteropCommands.shared.takeAll(owner: name) {
            _ = uvm_interop_send_refusal(p.conn, "the session ended before the host program started")
            p.close()
        }
    }

    private func serve(_ conn: Int32) {
        var buf = [CChar](repeating: 0, count: Int(UVM_INTEROP_MAX_REQUEST))
        var fds: [Int32] = [-1, -1, -1]
        var peer: pid_t = 0
        let n = uvm_interop_receive(conn, &buf, buf.count, &fds, &peer, 5000)
        guard n >= 0 else {
            Glibc.close(conn)
            return
        }
        let command = InteropCommand(conn: conn, fds: fds, owner: name)
        guard Self.descends(peer, from: sessionPID.load(ordering: .acquiring)) else {
            _ = uvm_interop_send_refusal(conn, "refused: only processes of the `uvm exec`/`uvm shell` session that set UVM_INTEROP may run host programs, and this one (pid \(peer)) has left it")
            command.close()
            return
        }
        struct Request: Decodable { var argv: [String]; var cwd: String }
        guard let r = try? JSONDecoder().decode(Request.self, from: Data(buf.prefix(Int(n)).map { UInt8(bitPattern: $0) })),
              !r.argv.isEmpty else {
            _ = uvm_interop_send_refusal(conn, "malformed request")
            command.close()
            return
        }
        let id = randomHex(16)
        guard InteropCommands.shared.add(id, command) else {
            _ = uvm_interop_send_refusal(conn, "too many uvm-host commands are waiting for the host already")
            command.close()
            return
        }
        do {
            try writeBlocking(.json(.hostRun, HostRunRequest(id: id, argv: r.argv, cwd: r.cwd)), outbound)
        } catch {
            if let p = InteropCommands.shared.take(id) {
                _ = uvm_interop_send_refusal(conn, "the session ended before the host program started")
                p.close()
            }
        }
    }

    /// Whether `pid` is `ancestor` or below it (parents from /proc; bounded).
    static func descends(_ pid: pid_t, from ancestor: pid_t) -> Bool {
        guard ancestor > 1 else { return false }
        var p = pid
        for _ in 0..<4096 {
            if p == ancestor { return true }
            if p <= 1 { return false }
            p = uvm_parent_pid(p)
        }
        return false
    }

    /// The session's environment additions.
    func environment(path: String) -> [String: String] {
        ["UVM_INTEROP": name, "PATH": "\(Self.overridesDirectory):\(path):\(Self.binDirectory)"]
    }
}

/// A `uvm-host` waiting for its program: its socket and the descriptors it handed over.
struct InteropCommand: Sendable {
    let conn: Int32
    let fds: [Int32]
    let owner: String
    func close() { ([conn] + fds).forEach { _ = Glibc.close($0) } }
}

/// Commands by id, between the session that received them and the attach stream uvmd opens.
final class InteropCommands: Sendable {
    static let shared = InteropCommands()
    private let waiting = Mutex<[String: InteropCommand]>([:])

    /// Commands waiting for uvmd to attach, all sessions together; more are refused.
    static let limit = 256

    func add(_ id: String, _ c: InteropCommand) -> Bool {
        waiting.withLock {
            guard $0.count < Self.limit else { return false }
            $0[id] = c
            return true
        }
    }
    func take(_ id: String) -> InteropCommand? { waiting.withLock { $0.removeValue(forKey: id) } }
    func takeAll(owner: String) -> [InteropCommand] {
        waiting.withLock { all in
            let mine = all.filter { $0.value.owner == owner }
            mine.keys.forEach { all[$0] = nil }
            return Array(mine.values)
        }
    }
}

enum InteropAttach {
    /// The program's stdio for the command `r.id`: output frames to its descriptors, its input
    /// and signals as frames, the exit status back to it.
    static func serve(_ r: InteropAttachRequest, inbound: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        guard let command = InteropCommands.shared.take(r.id) else {
            throw WireError(.notFound, "no uvm-host command waits as \(r.id)")
        }
        var stop: [Int32] = [-1, -1]
        guard uvm_pipe_cloexec(&stop) == 0 else {
            command.close()
            throw WireError(.internalError, "pipe: \(String(cString: strerror(errno)))")
        }
        let stopRead = stop[0], stopWrite = stop[1]
        let input = Task { try? await onOwnThread { pumpInput(command, stop: stopRead, outbound) } }
        defer {
            _ = Glibc.write(stopWrite, "x", 1)
            Task {
                await input.value
                Glibc.close(stopRead)
                Glibc.close(stopWrite)
                command.close()
            }
        }
        for await frame in inbound {
            switch frame.kind {
            case .stdout, .stderr:
                let fd = command.fds[frame.kind == .stdout ? 1 : 2], bytes = frame.payload
                // A closed reader (EPIPE) only loses this output, as it would on the host.
                await blocking { _ = bytes.withUnsafeReadableBytes { try? writeFully(fd, $0, "uvm-host output") } }
            case .exit:
                let status = (try? frame.decode(ExitStatus.self)) ?? ExitStatus(code: 125)
                _ = uvm_interop_send_exit(command.conn, status.code ?? 0, status.signal ?? 0)
                return
            default:
                break
            }
        }
        _ = uvm_interop_send_refusal(command.conn, "the host program's session ended (uvmd or the VM went away)")
    }

    /// The command's stdin (until EOF) and the signals it relays, as frames; ends at `stop`.
    private static func pumpInput(_ command: InteropCommand, stop: Int32, _ outbound: NIOAsyncChannelOutboundWriter<Frame>) {
        var stdinOpen = true
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            var p = [pollfd(fd: stop, events: Int16(POLLIN), revents: 0),
                     pollfd(fd: command.conn, events: Int16(POLLIN), revents: 0),
                     pollfd(fd: stdinOpen ? command.fds[0] : -1, events: Int16(POLLIN), revents: 0)]
            if poll(&p, 3, -1) < 0 {
                if errno == EINTR { continue }
                return
            }
            if p[0].revents != 0 { return }
            do {
                if p[1].revents != 0 {
                    var sig: UInt32 = 0
                    let n = withUnsafeMutableBytes(of: &sig) { recv(command.conn, $0.baseAddress, 4, Int32(MSG_WAITALL)) }
                    guard n == 4 else {
                        // uvm-host is gone (killed): the program goes too.
                        try writeBlocking(.signal(SIGHUP), outbound)
                        return
                    }
                    try writeBlocking(.signal(Int32(UInt32(bigEndian: sig))), outbound)
                }
                if stdinOpen && p[2].revents != 0 {
                    let n = read(command.fds[0], &buf, buf.count)
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    if n <= 0 {
                        stdinOpen = false
                        try writeBlocking(Frame(.stdinEOF), outbound)
                    } else {
                        try writeBlocking(Frame(.stdin, ByteBuffer(bytes: buf[0..<n])), outbound)
                    }
                }
            } catch {
                return  // the stream is closed
            }
        }
    }
}

private func randomHex(_ bytes: Int) -> String {
    var g = SystemRandomNumberGenerator()
    let b = (0..<bytes).map { _ in UInt8.random(in: 0...255, using: &g) }
    return b.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
}
