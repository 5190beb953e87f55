import NIOCore
import Testing
import Wire

@Suite struct FrameTests {
    @Test func roundTripsEveryKind() throws {
        var buf = ByteBuffer()
        for kind in FrameKind.allCases {
            buf.writeFrame(Frame(kind, ByteBuffer(string: "payload-\(kind.rawValue)")))
        }
        for kind in FrameKind.allCases {
            let f = try #require(try buf.readFrame())
            #expect(f.kind == kind)
            #expect(String(buffer: f.payload) == "payload-\(kind.rawValue)")
        }
        #expect(try buf.readFrame() == nil)
    }

    @Test func waitsForPartialFrames() throws {
        var whole = ByteBuffer()
        whole.writeFrame(Frame(.stdout, ByteBuffer(repeating: 7, count: 1000)))
        var partial = ByteBuffer()
        // Feed one byte at a time: no frame until the last byte arrives.
        for i in 0..<whole.readableBytes {
            partial.writeInteger(whole.getInteger(at: i, as: UInt8.self)!)
            let f = try partial.readFrame()
            if i < whole.readableBytes - 1 { #expect(f == nil) } else { #expect(f?.payload.readableBytes == 1000) }
        }
    }

    @Test func rejectsHostileHeaders() {
        var huge = ByteBuffer()
        huge.writeInteger(UInt32.max)
        huge.writeInteger(FrameKind.stdout.rawValue)
        #expect(throws: WireProtocolError.frameTooLarge(Int(UInt32.max))) { try huge.readFrame() }

        var empty = ByteBuffer()
        empty.writeInteger(UInt32(0))
        #expect(throws: WireProtocolError.self) { try empty.readFrame() }

        var unknown = ByteBuffer()
        unknown.writeInteger(UInt32(1))
        unknown.writeInteger(UInt8(99))
        #expect(throws: WireProtocolError.unknownKind(99)) { try unknown.readFrame() }
    }

    @Test func signalsResizeAndJSON() throws {
        #expect(Frame.signal(15).signalNumber == 15)
        let ws = try #require(Frame.resize(rows: 40, cols: 132).windowSize)
        #expect(ws.rows == 40 && ws.cols == 132)
        let req = DaemonRequest.exec(ExecRequest(argv: ["sh", "-c", "exit 7"], env: ["A=b"], tty: true))
        #expect(try Frame.json(.request, req).decode(DaemonRequest.self) == req)
        #expect(throws: WireProtocolError.self) { try Frame(.request, ByteBuffer(string: "{nope")).decode(DaemonRequest.self) }
    }

    @Test func exitStatusFollowsTheShell() {
        #expect(ExitStatus(code: 7).shellStatus == 7)
        #expect(ExitStatus(signal: 15).shellStatus == 143)
        #expect(FrameKind.exit.isFinal && FrameKind.error.isFinal && !FrameKind.stdout.isFinal)
    }
}
