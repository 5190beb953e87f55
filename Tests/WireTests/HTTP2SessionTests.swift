import Glibc
import NIOCore
import NIOPosix
import Testing
import Wire

/// The host<->guest link: HTTP/2 streams carrying frames, over a real socketpair (as over the
/// virtio-serial port), with a toy server that echoes stdin to stdout.
@Suite struct HTTP2SessionTests {
    func link() async throws -> (client: HTTP2Sessions.ClientMultiplexer, server: HTTP2Sessions.ClientMultiplexer, channels: [Channel]) {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let group = MultiThreadedEventLoopGroup.singleton
        let (sc, server) = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(inputOutput: fds[0]) { ch in
            HTTP2Sessions.configureServer(ch).map { (ch, $0) }
        }
        let (cc, client) = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(inputOutput: fds[1]) { ch in
            HTTP2Sessions.configureClient(ch).map { (ch, $0) }
        }
        return (client, server, [sc, cc])
    }

    /// Echo server: answers `info` with a response, `exec` by echoing stdin as stdout then exit 3.
    func serve(_ server: HTTP2Sessions.ClientMultiplexer) async throws {
        try await withThrowingDiscardingTaskGroup { group in
            for try await session in server.inbound {
                group.addTask {
                    try await FrameSession.serve(session) { first, rest, outbound in
                        let r = try first.decodeRequest(GuestRequest.self, who: "test agent")
                        if case .info = r { try await outbound.write(.json(.response, Done())); return }
                        var total = 0
                        for await frame in rest {
                            switch frame.kind {
                            case .stdin:
                                total += frame.payload.readableBytes
                                try await outbound.write(Frame(.stdout, frame.payload))
                            case .stdinEOF:
                                try await outbound.write(.json(.exit, ExitStatus(code: Int32(total % 256))))
                                return
                            default: break
                            }
                        }
                    }
                }
            }
        }
    }

    @Test func manyConcurrentSessionsEachGetTheirOwnBytes() async throws {
        let (client, server, channels) = try await link()
        let serverTask = Task { try await serve(server) }
        defer { serverTask.cancel(); channels.forEach { $0.close(promise: nil) } }

        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<40 {
                group.addTask {
                    let s = try await HTTP2Sessions.openSession(client)
                    try await s.executeThenClose { inbound, outbound in
                        try await outbound.write(.json(.request, GuestRequest.exec(GuestExecRequest(exec: ExecRequest(argv: ["cat"]), distroDisk: "uvm-test"))))
                        // Session i sends i*10_000+1 bytes of the byte i: more than one window for some.
                        let size = i * 10_000 + 1
                        let payload = ByteBuffer(repeating: UInt8(i), count: size)
                        var off = 0
                        while off < size {
                            let n = min(32 << 10, size - off)
                            try await outbound.write(Frame(.stdin, payload.getSlice(at: off, length: n)!))
                            off += n
                        }
                        try await outbound.write(Frame(.stdinEOF))
                        var got = 0
                        for try await frame in inbound {
                            if frame.kind == .stdout {
                                #expect(frame.payload.readableBytesView.allSatisfy { $0 == UInt8(i) })
                                got += frame.payload.readableBytes
                            }
                            if frame.kind == .exit {
                                #expect(try frame.decode(ExitStatus.self).code == Int32(size % 256))
                            }
                        }
                        #expect(got == size)
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    @Test func sessionsCloseCleanlyWithoutResets() async throws {
        let (client, server, channels) = try await link()
        let serverTask = Task { try await serve(server) }
        defer { serverTask.cancel(); channels.forEach { $0.close(promise: nil) } }
        // Far more sessions than NIO's default reset-rate limit (200 per 30 s) would allow if
        // each ended with RST_STREAM.
        for _ in 0..<400 {
            let s = try await HTTP2Sessions.openSession(client)
            let ok = try await s.executeThenClose { inbound, outbound in
                try await outbound.write(.json(.request, GuestRequest.info(InfoRequest())))
                var answered = false
                for try await f in inbound where f.kind == .response { answered = true }
                return answered
            }
            #expect(ok)
        }
    }

    /// A reader that falls behind (`uvm exec ... | less`) holds the guest back by flow control;
    /// when it catches up, the exit frame must still arrive. It was lost: the client answered the
    /// guest's END_STREAM before passing the final frame on, and when that frame came from the
    /// stream's backlog (not straight off the connection) the stream closed at once and the frame
    /// went nowhere ("the guest ended a session without answering").
    @Test func aSlowReaderStillGetsTheExitFrame() async throws {
        let (client, server, channels) = try await link()
        let serverTask = Task { try await serve(server) }
        defer { serverTask.cancel(); channels.forEach { $0.close(promise: nil) } }
        for round in 0..<3 {
            let s = try await HTTP2Sessions.openSession(client)
            let (got, exit) = try await s.executeThenClose { inbound, outbound in
                try await outbound.write(.json(.request, GuestRequest.exec(GuestExecRequest(exec: ExecRequest(argv: ["cat"]), distroDisk: "uvm-test"))))
                let chunk = ByteBuffer(repeating: 7, count: 16 << 10)
                for _ in 0..<64 { try await outbound.write(Frame(.stdin, chunk)) }
                try await outbound.write(Frame(.stdinEOF))
                // Not reading for a while: the echoed output backs up behind us.
                try await Task.sleep(for: .milliseconds(300))
                var got = 0
                var exit: Wire.ExitStatus? = nil
                for try await frame in inbound {
                    if frame.kind == .stdout { got += frame.payload.readableBytes }
                    if frame.kind == .exit { exit = try frame.decode(Wire.ExitStatus.self) }
                }
                return (got, exit)
            }
            #expect(got == 1 << 20, "round \(round)")
            #expect(exit?.code == 0, "round \(round): no exit frame after \(got) bytes")
        }
    }
}
