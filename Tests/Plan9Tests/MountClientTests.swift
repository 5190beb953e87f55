import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import Plan9

/// Plan9Client as `uvm mount` uses it: the server is the guest, so its replies are untrusted and
/// no wait is unbounded. And the server acting as another user (the guest agent's side).
@Suite struct MountClientTests {
    /// A strict client on one end of a socketpair; the test plays the server on the other.
    static func strictClient() throws -> (Plan9Client, Int32) {
        let (server, mine) = try socketPair()
        let client = try Plan9Client.connect(socket: mine, transport: { [] }).wait()
        return (client, server)
    }

    static func write(_ fd: Int32, _ frame: P9Frame) {
        var b = ByteBuffer()
        frame.encode(into: &b)
        let bytes = Array(b.readableBytesView)
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    @Test func aReplyToNoRequestEndsTheConnection() throws {
        let (client, server) = try Self.strictClient()
        defer { close(server) }
        let (tag, reply) = client.send(.tversion(msize: 8192, version: "9P2000.L"))
        Self.write(server, P9Frame(tag: tag &+ 1, message: .rclunk))
        #expect(throws: (any Error).self) { try reply.wait() }
        #expect(throws: Never.self) { try client.channel.closeFuture.wait() }
    }

    @Test func aRequestFromTheServerEndsTheConnection() throws {
        let (client, server) = try Self.strictClient()
        defer { close(server) }
        let (tag, reply) = client.send(.tclunk(fid: 1))
        Self.write(server, P9Frame(tag: tag, message: .tclunk(fid: 1)))
        #expect(throws: (any Error).self) { try reply.wait() }
    }

    @Test func aServerThatDoesNotAnswerTimesOut() throws {
        let (client, server) = try Self.strictClient()
        defer { close(server) }
        let started = Date()
        #expect(throws: Plan9ClientError.timedOut) { try client.call(.tclunk(fid: 1), timeout: .milliseconds(200)) }
        #expect(Date().timeIntervalSince(started) < 5)
        // A server that missed a deadline may still act: the connection is not used again.
        #expect(throws: Never.self) { try client.channel.closeFuture.wait() }
    }

    @Test func aTimelyReplyIsReturned() throws {
        let (client, server) = try Self.strictClient()
        defer { close(server) }
        let t = Thread {
            var buf = [UInt8](repeating: 0, count: 64)
            let n = read(server, &buf, buf.count)
            guard n >= 7 else { return }
            let tag = UInt16(buf[5]) | UInt16(buf[6]) << 8
            Self.write(server, P9Frame(tag: tag, message: .rclunk))
        }
        t.start()
        #expect(try client.call(.tclunk(fid: 1), timeout: .seconds(10)) == .rclunk)
    }

    @Test(.enabled(if: getuid() == 0, "needs root: only root can act as another user (the guest agent runs as root)"))
    func theServerActsAsItsIdentity() async throws {
        let fx = try Fixture(setup: { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/private", withIntermediateDirectories: false)
            chmod(share + "/private", 0o700)
            chmod(share, 0o777)
        })
        defer { Task { await fx.close() } }
        var logger = Logger(label: "plan9-test")
        logger.logLevel = .critical
        let server = try Plan9Server(export: Plan9Export(root: fx.share, identity: Plan9Identity(uid: 4242, gid: 4343, groups: [4343])),
                                     logger: logger)
        let (a, b) = try socketPair()
        let serving = Task { try await server.serve(connectedSocket: a) }
        let c = try await Plan9Client.connect(socket: b)
        _ = try await c.version()
        try await c.attach(fid: 0)
        _ = try await c.call(.twalk(fid: 0, newfid: 1, names: []))
        _ = try await c.call(.tlcreate(fid: 1, name: "made", flags: P9.OpenFlags.rdwr, mode: 0o644, gid: P9.noUname))
        var st = stat()
        #expect(stat(fx.share + "/made", &st) == 0)
        #expect(st.st_uid == 4242 && st.st_gid == 4343)
        // Root's private folder is not this user's.
        _ = try await c.call(.twalk(fid: 0, newfid: 2, names: ["private"]))
        await #expect(throws: P9Errno(EACCES)) {
            try await c.call(.tlcreate(fid: 2, name: "x", flags: P9.OpenFlags.rdwr, mode: 0o644, gid: P9.noUname))
        }
        await c.close()
        _ = try? await serving.value
        try await server.shutdown()
    }
}
