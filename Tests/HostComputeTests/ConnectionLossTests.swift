import Foundation
import Synchronization
import Testing

@testable import HostCompute

/// A one-connection unix-socket relay in front of libvirtd's socket. Cutting it looks, to the
/// client, exactly like libvirtd dying, without touching the daemon others share.
final class SocketRelay: @unchecked Sendable {
    let path: String
    private let stopPipe: [Int32]

    init(path: String, upstream: String) throws {
        self.path = path
        let listenFD = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listenFD >= 0, Self.withAddress(path, { bind(listenFD, $0, $1) }) == 0, listen(listenFD, 1) == 0
        else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        var fds: [Int32] = [0, 0]
        pipe(&fds)
        stopPipe = fds
        let stopFD = fds[0]
        let thread = Thread {
            let client = accept(listenFD, nil, nil)
            let server = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            defer { close(client); close(server); close(listenFD) }
            guard client >= 0, Self.withAddress(upstream, { connect(server, $0, $1) }) == 0 else { return }
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                var p = [pollfd(fd: client, events: Int16(POLLIN), revents: 0),
                         pollfd(fd: server, events: Int16(POLLIN), revents: 0),
                         pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
                if poll(&p, 3, -1) < 0 { if errno == EINTR { continue }; return }
                if p[2].revents != 0 { return }
                for (from, to) in [(0, server), (1, client)] where p[from].revents != 0 {
                    let n = read(p[from].fd, &buf, buf.count)
                    if n <= 0 || write(to, buf, n) != n { return }
                }
            }
        }
        thread.start()
    }

    /// Drops both sides of the relayed connection.
    func cut() { _ = write(stopPipe[1], "x", 1) }

    static func withAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}

@Suite struct ConnectionLossTests {
    /// The socket of this account's daemon: the system one for root, else the per-user one
    /// (which libvirt starts by itself on the first qemu:///session connection).
    static let daemonSocket: String = {
        if getuid() == 0 { return "/run/libvirt/libvirt-sock" }
        let env = ProcessInfo.processInfo.environment
        if let runtime = env["XDG_RUNTIME_DIR"], !runtime.isEmpty { return "\(runtime)/libvirt/libvirt-sock" }
        return "\(env["HOME"] ?? NSHomeDirectory())/.cache/libvirt/libvirt-sock"
    }()
    static let scheme = getuid() == 0 ? "qemu:///system" : "qemu:///session"

    @Test(.enabled(if: getuid() != 0 || access(daemonSocket, F_OK) == 0, "libvirtd is not running (no \(daemonSocket))"))
    func losingLibvirtdIsAnEventAndEndsTheStream() async throws {
        if getuid() != 0 { try await LibvirtConnection.open(uri: Self.scheme).close() }  // starts the per-user daemon
        let dir = NSTemporaryDirectory() + "uvm-hc-relay-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let relay = try SocketRelay(path: dir + "/libvirt-sock", upstream: Self.daemonSocket)

        let conn = try await LibvirtConnection.open(uri: "\(Self.scheme)?socket=\(relay.path)")
        defer { conn.close() }
        #expect(try await conn.lookup(name: "uvm-no-such-domain") == nil)

        let events = conn.events
        relay.cut()
        let received = await withTaskGroup(of: [DomainEvent]?.self) { group in
            group.addTask {
                var all: [DomainEvent] = []
                for await e in events { all.append(e) }
                return all  // the stream ended
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(60))
                return nil
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        let all = try #require(received, "the event stream did not end within 60 s of losing libvirtd")
        #expect(all.last?.kind == .connectionClosed)
        #expect(all.last?.detail == "libvirtd closed the connection")

        // Calls on the dead connection fail as such, quickly.
        let error = await #expect(throws: LibvirtError.self) { _ = try await conn.lookup(name: "x") }
        #expect(error?.kind == .connectionClosed)
        // A stream asked for after the loss is already over.
        for await e in conn.events { Issue.record("unexpected \(e)") }
    }
}
