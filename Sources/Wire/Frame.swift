import NIOCore

/// What a frame carries. The same frames travel CLI <-> uvmd (a unix socket) and
/// uvmd <-> uvm-init (one HTTP/2 stream per session), so uvmd relays them unchanged.
public enum FrameKind: UInt8, Sendable, CaseIterable {
    // client -> server
    case request = 1       // JSON `Request`; always the first frame of a session
    case stdin = 2         // raw bytes
    case stdinEOF = 3      // empty
    case signal = 4        // Int32 big-endian signal number
    case resize = 5        // UInt16 rows, UInt16 cols, big-endian
    // server -> client
    case stdout = 16       // raw bytes
    case stderr = 17       // raw bytes
    case exit = 18         // JSON `ExitStatus`; final
    case error = 19        // JSON `WireError`; final
    case progress = 20     // UTF-8 line for the user (boot progress and the like)
    case response = 21     // JSON, operation-specific; final
    case event = 22        // JSON, operation-specific; one of many (watchPorts snapshots)
    case stdoutEOF = 23    // empty: no more stdout (a relayed connection's half-close)
    case stdinAck = 24     // UInt32 big-endian: that many more stdin bytes reached the process (exec)
    case hostRun = 25      // JSON `HostRunRequest`, agent -> uvmd on an exec: `uvm-host` wants a host program
    case connect = 26      // UInt16 big-endian port: uvmd -> agent, a forwarded connection's `request` (GuestRequest.frame)

    /// A final frame ends the session: nothing follows it in that direction.
    public var isFinal: Bool { self == .exit || self == .error || self == .response }
}

public struct Frame: Sendable, Equatable {
    public var kind: FrameKind
    public var payload: ByteBuffer

    public init(_ kind: FrameKind, _ payload: ByteBuffer = ByteBuffer()) {
        self.kind = kind
        self.payload = payload
    }

    /// Largest payload accepted from a peer: a bound on what a hostile or broken peer can make us buffer.
    public static let maxPayload = 4 << 20
    /// Header: 4-byte big-endian length of (kind + payload), then the kind byte.
    public static let headerSize = 5
    /// How many stdin bytes an exec client may have sent that the guest has not acknowledged
    /// (`stdinAck`) yet. Flow control for stdin lives here, not in the socket and HTTP/2 windows,
    /// so that those are never full and a signal or resize behind the data arrives at once.
    /// Below uvmd's and the guest's per-session buffers and the HTTP/2 stream window (4 MiB each),
    /// so no hop ever stops reading; large enough to keep a fast reader fed across the round trip.
    public static let stdinWindow = 2 << 20
}

public enum WireProtocolError: Error, CustomStringConvertible, Equatable {
    case frameTooLarge(Int)
    case unknownKind(UInt8)
    case malformed(String)

    public var description: String {
        switch self {
        case .frameTooLarge(let n): return "protocol error: frame of \(n) bytes is larger than \(Frame.maxPayload)"
        case .unknownKind(let k): return "protocol error: unknown frame kind \(k)"
        case .malformed(let what): return "protocol error: \(what)"
        }
    }
}

extension ByteBuffer {
    /// Appends a frame in wire form.
    public mutating func writeFrame(_ frame: Frame) {
        self.writeInteger(UInt32(1 + frame.payload.readableBytes))
        self.writeInteger(frame.kind.rawValue)
        var payload = frame.payload
        self.writeBuffer(&payload)
    }

    /// Reads one whole frame if the buffer holds one; nil when more bytes are needed.
    public mutating func readFrame() throws -> Frame? {
        guard let length = self.getInteger(at: self.readerIndex, as: UInt32.self) else { return nil }
        guard length >= 1, length - 1 <= UInt32(Frame.maxPayload) else {
            throw WireProtocolError.frameTooLarge(Int(length))
        }
        guard self.readableBytes >= 4 + Int(length) else { return nil }
        self.moveReaderIndex(forwardBy: 4)
        let rawKind: UInt8 = self.readInteger()!
        guard let kind = FrameKind(rawValue: rawKind) else { throw WireProtocolError.unknownKind(rawKind) }
        let payload = self.readSlice(length: Int(length) - 1)!
        return Frame(kind, payload)
    }
}

/// Byte stream -> frames.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = Frame
    public init() {}
    public mutating func decode(buffer: inout ByteBuffer) throws -> Frame? { try buffer.readFrame() }
    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        try self.decode(buffer: &buffer)
    }
}

/// Frames -> byte stream.
public struct FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = Frame
    public init() {}
    public func encode(data: Frame, out: inout ByteBuffer) throws { out.writeFrame(data) }
}

extension ChannelPipeline.SynchronousOperations {
    /// Adds the frame codec to a byte-stream pipeline (a unix socket, a pipe).
    public func addFrameCodec() throws {
        try self.addHandler(ByteToMessageHandler(FrameDecoder()))
        try self.addHandler(MessageToByteHandler(FrameEncoder()))
    }
}
