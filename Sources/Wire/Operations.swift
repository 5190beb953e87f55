import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The version of the messages below. Both links check it on every request, so that a `uvm`,
/// uvmd and guest agent from different builds say so instead of misreading each other (a new
/// uvmd adopting a VM whose agent predates stdin acknowledgements would stall every exec after
/// 2 MiB of input). Bump it on any change an older peer would get wrong.
public enum WireVersion {
    public static let current = 5
    /// Requests without a version come from before versioning (protocol 1).
    public static let unversioned = 1
}

/// A request whose answer is one `response` frame holding `Response` (or one `error` frame).
public protocol WireCall: Codable, Sendable, Equatable {
    associatedtype Response: Codable & Sendable
}

/// An empty acknowledgement: the operation was done. (An older agent's `{"ok": true}` reads as one.)
public struct Done: Codable, Sendable, Equatable {
    public init() {}
}

// MARK: CLI -> uvmd

/// Everything `uvm` asks of uvmd: the first frame (`request`) of a session on uvmd's socket.
public enum DaemonRequest: Sendable, Equatable {
    /// A process in a distro; then stdin/signal/resize frames in, stdout/stderr out, `exit` last.
    case exec(ExecRequest)
    case start(StartRequest)
    case stop(StopRequest)
    case status(StatusRequest)
    case shareAdd(ShareAddRequest)
    case shareList(ShareListRequest)
    case shareRemove(ShareRemoveRequest)
    case ports(PortsRequest)
    /// Then the tar stream as `stdin` frames.
    case importDistro(ImportRequest)
    /// `stdout` frames carry the tar stream.
    case export(ExportRequest)
    case unregister(UnregisterRequest)
    case setDefault(SetDefaultRequest)
    case terminate(TerminateRequest)
    case resize(ResizeRequest)
    case compact(CompactRequest)
    /// `uvm cp` into a distro; then the tar as `stdin` frames.
    case copyIn(CopyInRequest)
    /// `uvm cp` out of a distro; `stdout` frames carry the tar.
    case copyOut(CopyOutRequest)
    /// A distro's files over 9P2000.L (`uvm mount`): `stdin` frames carry the client's 9P bytes,
    /// `stdout` frames the server's, after one `event` frame (`ServeFilesReady`).
    case files(FilesRequest)
}

/// A call `uvm` makes to uvmd.
public protocol DaemonCall: WireCall {
    var request: DaemonRequest { get }
}

/// Boot the VM if it is not running; answers the status once it is up.
public struct StartRequest: DaemonCall {
    public typealias Response = VMStatus
    public init() {}
    public var request: DaemonRequest { .start(self) }
}

/// Stop the VM cleanly (destroying it if that does not finish in time).
public struct StopRequest: DaemonCall {
    public typealias Response = VMStatus
    public init() {}
    public var request: DaemonRequest { .stop(self) }
}

/// Describe the VM, its instances and the reaper's view. Starts nothing.
public struct StatusRequest: DaemonCall {
    public typealias Response = VMStatus
    public init() {}
    public var request: DaemonRequest { .status(self) }
}

/// Export a host folder at /mnt/host/NAME (mounted at once when the VM runs).
public struct ShareAddRequest: DaemonCall {
    public typealias Response = ShareStatus
    public var share: ShareSpec
    public init(share: ShareSpec) { self.share = share }
    public var request: DaemonRequest { .shareAdd(self) }
}

public struct ShareListRequest: DaemonCall {
    public typealias Response = [ShareStatus]
    public init() {}
    public var request: DaemonRequest { .shareList(self) }
}

/// Stop exporting a folder; answers the shares that remain.
public struct ShareRemoveRequest: DaemonCall {
    public typealias Response = [ShareStatus]
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .shareRemove(self) }
}

/// What is forwarded to host localhost.
public struct PortsRequest: DaemonCall {
    public typealias Response = [ForwardedPort]
    public init() {}
    public var request: DaemonRequest { .ports(self) }
}

// MARK: uvmd -> guest agent

/// Everything uvmd asks of the guest agent: the first frame of an HTTP/2 stream to uvm-init.
public enum GuestRequest: Sendable, Equatable {
    /// As `DaemonRequest.exec`, with the distro's disk resolved.
    case exec(GuestExecRequest)
    case info(InfoRequest)
    case shutdown(ShutdownRequest)
    case mount(MountRequest)
    case unmount(UnmountRequest)
    case stopInstance(StopInstanceRequest)
    case startInstance(StartInstanceRequest)
    /// `event` frames, each a `[ListeningPort]` snapshot, until either side ends the stream.
    case watchPorts(WatchPortsRequest)
    /// One TCP connection to the guest's loopback: `stdin`/`stdout` frames carry its bytes,
    /// `stdinEOF`/`stdoutEOF` its half-closes; a refused connect is an `error` frame.
    case connect(ConnectRequest)
    case importDistro(ImportDistroRequest)
    case exportDistro(ExportDistroRequest)
    case releaseDisk(ReleaseDiskRequest)
    case swapOn(SwapOnRequest)
    case memoryPolicy(MemoryPolicyRequest)
    case trim(TrimRequest)
    case instanceActivity(InstanceActivityRequest)
    /// As `DaemonRequest.copyIn`/`copyOut`, with the distro's disk resolved.
    case copyIn(GuestCopyInRequest)
    case copyOut(GuestCopyOutRequest)
    /// The stdio of a host program that `uvm-host` asked for (see `HostRunRequest`).
    case interopAttach(InteropAttachRequest)
    /// As `DaemonRequest.files`, with the distro's disk resolved.
    case serveFiles(ServeFilesRequest)
}

/// A call uvmd makes to the guest agent.
public protocol GuestCall: WireCall {
    var request: GuestRequest { get }
}

public struct GuestExecRequest: Codable, Sendable, Equatable {
    public var exec: ExecRequest
    /// Serial of the distro's disk (`uvm-NAME`), as uvmd attached it.
    public var distroDisk: String
    public init(exec: ExecRequest, distroDisk: String) {
        self.exec = exec
        self.distroDisk = distroDisk
    }
}

public struct InfoRequest: GuestCall {
    public typealias Response = GuestInfo
    public init() {}
    public var request: GuestRequest { .info(self) }
}

/// Use the disk `serial` (made with mkswap on the host) as swap, with discard, so that swap the
/// guest frees goes back to the host's sparse file.
public struct SwapOnRequest: GuestCall {
    public typealias Response = Done
    public var serial: String
    public init(serial: String) { self.serial = serial }
    public var request: GuestRequest { .swapOn(self) }
}

/// WSL's `autoMemoryReclaim`: what the guest does with its caches once it has been idle.
public enum MemoryReclaimMode: String, Codable, Sendable, CaseIterable {
    /// Nothing: free page reporting alone returns what the guest frees by itself.
    case disabled
    /// Drop the page cache and reclaimable slab at once, then compact.
    case dropCache
    /// Reclaim through the root memory cgroup in steps, oldest pages first, stopping as soon as the
    /// guest is busy again; then compact.
    case gradual
}

/// How the guest gives memory back: the reclaim policy (applied by the agent on its own, from the
/// guest's CPU use) and the pace of free page reporting.
public struct MemoryPolicyRequest: GuestCall {
    public typealias Response = Done
    public var mode: MemoryReclaimMode
    /// How long the guest's CPU use must stay at or below `idlePermille` before a reclaim.
    public var idleDelayMilliseconds: Int
    /// Idle threshold in thousandths of all vCPUs' time (WSL: 0.5% = 5).
    public var idlePermille: Int
    /// Free page reporting: smallest block reported (a power of two of pages), the wait before a
    /// pass, and 1/budgetDivisor of each free list per pass (uvm's kernel patch 0002).
    public var reportingOrder: Int?
    public var reportingDelayMilliseconds: Int?
    public var reportingBudgetDivisor: Int?
    public init(mode: MemoryReclaimMode, idleDelayMilliseconds: Int, idlePermille: Int = 5,
                reportingOrder: Int? = nil, reportingDelayMilliseconds: Int? = nil, reportingBudgetDivisor: Int? = nil) {
        self.mode = mode
        self.idleDelayMilliseconds = idleDelayMilliseconds
        self.idlePermille = idlePermille
        self.reportingOrder = reportingOrder
        self.reportingDelayMilliseconds = reportingDelayMilliseconds
        self.reportingBudgetDivisor = reportingBudgetDivisor
    }
    public var request: GuestRequest { .memoryPolicy(self) }
}

/// FITRIM on the distro disk `serial` (mounting it for the call if no instance has it), so that
/// blocks its file system no longer uses go back to the host's sparse file.
public struct TrimRequest: GuestCall {
    public typealias Response = TrimResult
    public var serial: String
    public init(serial: String) { self.serial = serial }
    public var request: GuestRequest { .trim(self) }
}

public struct TrimResult: Codable, Sendable, Equatable {
    /// What the file system reported as trimmed (free space it passed down, not what the host
    /// had allocated).
    public var trimmedBytes: UInt64
    public init(trimmedBytes: UInt64) { self.trimmedBytes = trimmedBytes }
}

/// What keeps an idle instance running under its `[boot] keepAlive = services` (asked by the
/// idle reaper before it stops one).
public struct InstanceActivityRequest: GuestCall {
    public typealias Response = InstanceActivity
    public var name: String
    public init(name: String) { self.name = name }
    public var request: GuestRequest { .instanceActivity(self) }
}

public struct InstanceActivity: Codable, Sendable, Equatable {
    /// Why it must not stop ("docker.service", "port 8080"); empty: it may.
    public var keptBy: [String]
    public init(keptBy: [String]) { self.keptBy = keptBy }
}

/// Stop every instance, unmount the shares, sync, then power off once the answer is sent.
public struct ShutdownRequest: GuestCall {
    public typealias Response = Done
    public init() {}
    public var request: GuestRequest { .shutdown(self) }
}

extension MountRequest: GuestCall {
    public typealias Response = Done
    public var request: GuestRequest { .mount(self) }
}

public struct UnmountRequest: GuestCall {
    public typealias Response = Done
    public var name: String
    public init(name: String) { self.name = name }
    public var request: GuestRequest { .unmount(self) }
}

/// Start one distro instance now, as its first exec would (an exec that comes meanwhile joins the
/// start). uvmd asks when it has booted the VM for a command in that distro, so that the start
/// overlaps the rest of the VM's set-up instead of following it.
public struct StartInstanceRequest: GuestCall {
    public typealias Response = Done
    public var name: String
    /// Serial of the distro's disk (`uvm-NAME`), as uvmd attached it.
    public var diskSerial: String
    public init(name: String, diskSerial: String) {
        self.name = name
        self.diskSerial = diskSerial
    }
    public var request: GuestRequest { .startInstance(self) }
}

/// Stop one distro instance: signal its processes, sync, unmount its disk.
public struct StopInstanceRequest: GuestCall {
    public typealias Response = Done
    public var name: String
    public init(name: String) { self.name = name }
    public var request: GuestRequest { .stopInstance(self) }
}

public struct WatchPortsRequest: Codable, Sendable, Equatable {
    public init() {}
}

public struct ConnectRequest: Codable, Sendable, Equatable {
    public var port: UInt16
    public init(port: UInt16) { self.port = port }
}

extension GuestRequest {
    /// The first frame of this request's session. A forwarded connection's `connect` is a frame
    /// of its own kind holding just the port: it is the one request made per connection, and
    /// decoding its JSON was about a tenth of the agent's work per connection (emulated, under TCG).
    public var frame: Frame {
        guard case .connect(let c) = self else { return .json(.request, self) }
        var port = ByteBuffer()
        port.writeInteger(c.port)
        return Frame(.connect, port)
    }
}

// MARK: the envelope

/// On the wire a request is `{"version": 3, "op": "<case>", "args": {...}}`. "op" keeps the
/// operation names of protocol 1, whose peers read it too: an older agent still answers `info`
/// (which tells its version) and `shutdown`, so a new uvmd can see what it adopted and stop it.
private enum EnvelopeKeys: String, CodingKey { case version, op, args }

/// The parts of a request every version can read.
public struct RequestHeader: Decodable, Sendable {
    public var version: Int
    public var op: String
    private enum Keys: String, CodingKey { case version, op }
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        version = try c.decodeIfPresent(Int.self, forKey: .version) ?? WireVersion.unversioned
        op = try c.decode(String.self, forKey: .op)
    }
}

private func encodeEnvelope(_ op: String, _ encoder: Encoder, args: (inout KeyedEncodingContainer<EnvelopeKeys>) throws -> Void) throws {
    var c = encoder.container(keyedBy: EnvelopeKeys.self)
    try c.encode(WireVersion.current, forKey: .version)
    try c.encode(op, forKey: .op)
    try args(&c)
}

private func unknownOperation(_ op: String, _ c: KeyedDecodingContainer<EnvelopeKeys>) -> Error {
    DecodingError.dataCorruptedError(forKey: .op, in: c, debugDescription: "unknown operation '\(op)'")
}

extension DaemonRequest: Codable {
    public func encode(to encoder: Encoder) throws {
        try encodeEnvelope(op, encoder) { try encodeArgs(to: &$0) }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: EnvelopeKeys.self)
        try self.init(op: try c.decode(String.self, forKey: .op), args: c)
    }

    public var op: String {
        switch self {
        case .exec: "exec"
        case .start: "start"
        case .stop: "stop"
        case .status: "status"
        case .shareAdd: "shareAdd"
        case .shareList: "shareList"
        case .shareRemove: "shareRemove"
        case .ports: "ports"
        case .importDistro: "import"
        case .export: "export"
        case .unregister: "unregister"
        case .setDefault: "setDefault"
        case .terminate: "terminate"
        case .resize: "resize"
        case .compact: "compact"
        case .copyIn: "copyIn"
        case .copyOut: "copyOut"
        case .files: "files"
        }
    }

    private func encodeArgs(to c: inout KeyedEncodingContainer<EnvelopeKeys>) throws {
        switch self {
        case .exec(let r): try c.encode(r, forKey: .args)
        case .start(let r): try c.encode(r, forKey: .args)
        case .stop(let r): try c.encode(r, forKey: .args)
        case .status(let r): try c.encode(r, forKey: .args)
        case .shareAdd(let r): try c.encode(r, forKey: .args)
        case .shareList(let r): try c.encode(r, forKey: .args)
        case .shareRemove(let r): try c.encode(r, forKey: .args)
        case .ports(let r): try c.encode(r, forKey: .args)
        case .importDistro(let r): try c.encode(r, forKey: .args)
        case .export(let r): try c.encode(r, forKey: .args)
        case .unregister(let r): try c.encode(r, forKey: .args)
        case .setDefault(let r): try c.encode(r, forKey: .args)
        case .terminate(let r): try c.encode(r, forKey: .args)
        case .resize(let r): try c.encode(r, forKey: .args)
        case .compact(let r): try c.encode(r, forKey: .args)
        case .copyIn(let r): try c.encode(r, forKey: .args)
        case .copyOut(let r): try c.encode(r, forKey: .args)
        case .files(let r): try c.encode(r, forKey: .args)
        }
    }

    private init(op: String, args c: KeyedDecodingContainer<EnvelopeKeys>) throws {
        switch op {
        case "exec": self = .exec(try c.decode(ExecRequest.self, forKey: .args))
        case "start": self = .start(try c.decode(StartRequest.self, forKey: .args))
        case "stop": self = .stop(try c.decode(StopRequest.self, forKey: .args))
        case "status": self = .status(try c.decode(StatusRequest.self, forKey: .args))
        case "shareAdd": self = .shareAdd(try c.decode(ShareAddRequest.self, forKey: .args))
        case "shareList": self = .shareList(try c.decode(ShareListRequest.self, forKey: .args))
        case "shareRemove": self = .shareRemove(try c.decode(ShareRemoveRequest.self, forKey: .args))
        case "ports": self = .ports(try c.decode(PortsRequest.self, forKey: .args))
        case "import": self = .importDistro(try c.decode(ImportRequest.self, forKey: .args))
        case "export": self = .export(try c.decode(ExportRequest.self, forKey: .args))
        case "unregister": self = .unregister(try c.decode(UnregisterRequest.self, forKey: .args))
        case "setDefault": self = .setDefault(try c.decode(SetDefaultRequest.self, forKey: .args))
        case "terminate": self = .terminate(try c.decode(TerminateRequest.self, forKey: .args))
        case "resize": self = .resize(try c.decode(ResizeRequest.self, forKey: .args))
        case "compact": self = .compact(try c.decode(CompactRequest.self, forKey: .args))
        case "copyIn": self = .copyIn(try c.decode(CopyInRequest.self, forKey: .args))
        case "copyOut": self = .copyOut(try c.decode(CopyOutRequest.self, forKey: .args))
        case "files": self = .files(try c.decode(FilesRequest.self, forKey: .args))
        default: throw unknownOperation(op, c)
        }
    }
}

extension GuestRequest: Codable {
    public func encode(to encoder: Encoder) throws {
        try encodeEnvelope(op, encoder) { try encodeArgs(to: &$0) }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: EnvelopeKeys.self)
        try self.init(op: try c.decode(String.self, forKey: .op), args: c)
    }

    public var op: String {
        switch self {
        case .exec: "exec"
        case .info: "info"
        case .shutdown: "shutdown"
        case .mount: "mount"
        case .unmount: "unmount"
        case .stopInstance: "stopInstance"
        case .startInstance: "startInstance"
        case .watchPorts: "watchPorts"
        case .connect: "connect"
        case .importDistro: "importDistro"
        case .exportDistro: "exportDistro"
        case .releaseDisk: "releaseDisk"
        case .swapOn: "swapOn"
        case .memoryPolicy: "memoryPolicy"
        case .trim: "trim"
        case .instanceActivity: "instanceActivity"
        case .copyIn: "copyIn"
        case .copyOut: "copyOut"
        case .interopAttach: "interopAttach"
        case .serveFiles: "serveFiles"
        }
    }

    private func encodeArgs(to c: inout KeyedEncodingContainer<EnvelopeKeys>) throws {
        switch self {
        case .exec(let r): try c.encode(r, forKey: .args)
        case .info(let r): try c.encode(r, forKey: .args)
        case .shutdown(let r): try c.encode(r, forKey: .args)
        case .mount(let r): try c.encode(r, forKey: .args)
        case .unmount(let r): try c.encode(r, forKey: .args)
        case .stopInstance(let r): try c.encode(r, forKey: .args)
        case .startInstance(let r): try c.encode(r, forKey: .args)
        case .watchPorts(let r): try c.encode(r, forKey: .args)
        case .connect(let r): try c.encode(r, forKey: .args)
        case .importDistro(let r): try c.encode(r, forKey: .args)
        case .exportDistro(let r): try c.encode(r, forKey: .args)
        case .releaseDisk(let r): try c.encode(r, forKey: .args)
        case .swapOn(let r): try c.encode(r, forKey: .args)
        case .memoryPolicy(let r): try c.encode(r, forKey: .args)
        case .trim(let r): try c.encode(r, forKey: .args)
        case .instanceActivity(let r): try c.encode(r, forKey: .args)
        case .copyIn(let r): try c.encode(r, forKey: .args)
        case .copyOut(let r): try c.encode(r, forKey: .args)
        case .interopAttach(let r): try c.encode(r, forKey: .args)
        case .serveFiles(let r): try c.encode(r, forKey: .args)
        }
    }

    private init(op: String, args c: KeyedDecodingContainer<EnvelopeKeys>) throws {
        switch op {
        case "exec": self = .exec(try c.decode(GuestExecRequest.self, forKey: .args))
        case "info": self = .info(try c.decode(InfoRequest.self, forKey: .args))
        case "shutdown": self = .shutdown(try c.decode(ShutdownRequest.self, forKey: .args))
        case "mount": self = .mount(try c.decode(MountRequest.self, forKey: .args))
        case "unmount": self = .unmount(try c.decode(UnmountRequest.self, forKey: .args))
        case "stopInstance": self = .stopInstance(try c.decode(StopInstanceRequest.self, forKey: .args))
        case "startInstance": self = .startInstance(try c.decode(StartInstanceRequest.self, forKey: .args))
        case "watchPorts": self = .watchPorts(try c.decode(WatchPortsRequest.self, forKey: .args))
        case "connect": self = .connect(try c.decode(ConnectRequest.self, forKey: .args))
        case "importDistro": self = .importDistro(try c.decode(ImportDistroRequest.self, forKey: .args))
        case "exportDistro": self = .exportDistro(try c.decode(ExportDistroRequest.self, forKey: .args))
        case "releaseDisk": self = .releaseDisk(try c.decode(ReleaseDiskRequest.self, forKey: .args))
        case "swapOn": self = .swapOn(try c.decode(SwapOnRequest.self, forKey: .args))
        case "memoryPolicy": self = .memoryPolicy(try c.decode(MemoryPolicyRequest.self, forKey: .args))
        case "trim": self = .trim(try c.decode(TrimRequest.self, forKey: .args))
        case "instanceActivity": self = .instanceActivity(try c.decode(InstanceActivityRequest.self, forKey: .args))
        case "copyIn": self = .copyIn(try c.decode(GuestCopyInRequest.self, forKey: .args))
        case "copyOut": self = .copyOut(try c.decode(GuestCopyOutRequest.self, forKey: .args))
        case "interopAttach": self = .interopAttach(try c.decode(InteropAttachRequest.self, forKey: .args))
        case "serveFiles": self = .serveFiles(try c.decode(ServeFilesRequest.self, forKey: .args))
        default: throw unknownOperation(op, c)
        }
    }
}

/// A request read in one pass over its JSON (the guest agent parses every exec's under TCG):
/// the header first, and the operation only when the version is ours, so that a request of
/// another version is refused, never misread.
private enum VersionChecked<R: Decodable>: Decodable {
    case request(R)
    case otherVersion(Int)

    init(from decoder: Decoder) throws {
        let header = try RequestHeader(from: decoder)
        guard header.version == WireVersion.current else {
            self = .otherVersion(header.version)
            return
        }
        do {
            self = .request(try R(from: decoder))
        } catch {
            throw WireError(.badRequest, "malformed '\(header.op)' request: \(error)")
        }
    }
}

extension Frame {
    /// The request this session starts with. A peer speaking another protocol version gets a
    /// `versionMismatch` error naming both versions (`who` is the side answering, e.g. "uvmd
    /// (pid 42)"); a malformed one gets `badRequest`.
    public func decodeRequest<R: Decodable>(_ type: R.Type, who: String) throws -> R {
        guard kind == .request else { throw WireError(.protocolError, "the session did not start with a request") }
        let checked: VersionChecked<R>
        do {
            checked = try JSONDecoder().decode(VersionChecked<R>.self, from: Data(payload.readableBytesView))
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError(.badRequest, "malformed request: \(error)")
        }
        switch checked {
        case .request(let r):
            return r
        case .otherVersion(let version):
            throw WireError(.versionMismatch, "\(who) speaks uvm protocol \(WireVersion.current), the request protocol \(version): they come from different uvm versions")
        }
    }

    /// What a guest session starts with: a `request` frame, or a forwarded connection's `connect`
    /// frame (see `GuestRequest.frame`). A connect frame carries no version: uvmd checks the
    /// agent's once per link (`info`) before it opens any.
    public func decodeGuestRequest(who: String) throws -> GuestRequest {
        guard kind == .connect else { return try decodeRequest(GuestRequest.self, who: who) }
        guard payload.readableBytes == 2, let port = payload.getInteger(at: payload.readerIndex, as: UInt16.self) else {
            throw WireError(.badRequest, "malformed connect frame: \(payload.readableBytes) bytes, not a 2-byte port")
        }
        return .connect(ConnectRequest(port: port))
    }

    /// The operation named by a request frame, for logs; "?" when unreadable.
    public var requestOperation: String {
        (try? JSONDecoder().decode(RequestHeader.self, from: Data(payload.readableBytesView)).op) ?? "?"
    }
}
