import Foundation
import NIOCore
import Testing
import Wire

/// The typed contract: every operation survives the wire, and a peer from another build is told so.
@Suite struct OperationTests {
    static let daemonRequests: [DaemonRequest] = [
        .exec(ExecRequest(argv: ["make", "-j2"], env: ["A=b"], cwd: "/tmp", user: "me", distro: "debian", tty: true, rows: 40, cols: 120)),
        StartRequest().request, StopRequest().request, StatusRequest().request,
        ShareAddRequest(share: ShareSpec(name: "src", path: "/home/me/src", readOnly: true, metadata: true)).request,
        ShareListRequest().request, ShareRemoveRequest(name: "src").request, PortsRequest().request,
        ImportRequest(name: "alpine", spool: "/home/me/.local/share/uvm/spool/import-1-abc.tar", sizeBytes: 1 << 30, setDefault: true).request, ExportRequest(name: "debian").request,
        UnregisterRequest(name: "x").request, SetDefaultRequest(name: "debian").request, TerminateRequest(name: "debian").request,
        ResizeRequest(name: "debian", sizeBytes: 32 << 30).request, CompactRequest(name: "debian").request,
    ]

    static let guestRequests: [GuestRequest] = [
        .exec(GuestExecRequest(exec: ExecRequest(argv: ["true"]), distroDisk: "uvm-busybox")),
        InfoRequest().request, ShutdownRequest().request,
        MountRequest(name: "home", port: "uvm.9p.0", readOnly: true, msize: 65536, aname: "/x", channel: 3).request,
        UnmountRequest(name: "home").request, StopInstanceRequest(name: "debian").request,
        StartInstanceRequest(name: "debian", diskSerial: "uvm-debian").request,
        .watchPorts(WatchPortsRequest()), .connect(ConnectRequest(port: 8080)),
        ImportDistroRequest(name: "debian", diskSerial: "uvm-debian", sourceSerial: "uvm.src.1", sourceBytes: 10240, defaultUser: DefaultUser(name: "me", uid: 1000, gid: 1000)).request,
        ExportDistroRequest(name: "debian", diskSerial: "uvm-debian", targetSerial: "uvm.dst.1", targetBytes: 1 << 30).request, ReleaseDiskRequest(name: "x", diskSerial: "uvm-x").request, SwapOnRequest(serial: "uvm.swap").request,
        MemoryPolicyRequest(mode: .gradual, idleDelayMilliseconds: 3000, reportingOrder: 5, reportingDelayMilliseconds: 250, reportingBudgetDivisor: 1).request,
        TrimRequest(serial: "uvm-debian").request, InstanceActivityRequest(name: "debian").request,
    ]

    @Test(arguments: daemonRequests) func daemonRequestsRoundTrip(_ r: DaemonRequest) throws {
        #expect(try Frame.json(.request, r).decodeRequest(DaemonRequest.self, who: "test") == r)
    }

    @Test(arguments: guestRequests) func guestRequestsRoundTrip(_ r: GuestRequest) throws {
        #expect(try Frame.json(.request, r).decodeRequest(GuestRequest.self, who: "test") == r)
        // What uvmd actually sends: a connect is a frame of its own.
        #expect(try r.frame.decodeGuestRequest(who: "test") == r)
    }

    /// A forwarded connection's request is two bytes, not JSON; a connect frame of another length
    /// is refused, not read past or short.
    @Test func aConnectIsTwoBytesAndOtherLengthsAreRefused() throws {
        let frame = GuestRequest.connect(ConnectRequest(port: 0x1F90)).frame
        #expect(frame.kind == .connect)
        #expect(Array(frame.payload.readableBytesView) == [0x1F, 0x90])
        for bytes: [UInt8] in [[], [0x1F], [0x1F, 0x90, 0]] {
            let e = try #require(throws: WireError.self) { try Frame(.connect, ByteBuffer(bytes: bytes)).decodeGuestRequest(who: "agent") }
            #expect(e.code == .badRequest)
        }
        // Through the frame codec as the agent gets it.
        var wire = ByteBuffer()
        wire.writeFrame(frame)
        #expect(try wire.readFrame()?.decodeGuestRequest(who: "agent") == .connect(ConnectRequest(port: 8080)))
    }

    /// Each side rejects the other side's operations: they are separate enums now.
    @Test func aGuestOperationIsNotADaemonOperation() throws {
        let frame = Frame.json(.request, InfoRequest().request)
        let e = try #require(throws: WireError.self) { try frame.decodeRequest(DaemonRequest.self, who: "uvmd") }
        #expect(e.code == .badRequest)
        #expect(e.message.contains("'info'"))
        let s = Frame.json(.request, StatusRequest().request)
        #expect(throws: WireError.self) { try s.decodeRequest(GuestRequest.self, who: "agent") }
    }

    @Test func versionIsOnTheWire() throws {
        let json = try #require(String(data: Data(Frame.json(.request, StatusRequest().request).payload.readableBytesView), encoding: .utf8))
        #expect(json == #"{"args":{},"op":"status","version":\#(WireVersion.current)}"#)
    }

    /// A request of protocol 1 (no version: `{"op": "exec", "exec": {...}}`) or of a later one is
    /// refused with versionMismatch naming both, not misread.
    @Test(arguments: [#"{"op":"exec","exec":{"argv":["true"],"env":[],"tty":false}}"#,
                      #"{"version":99,"op":"status","args":{}}"#])
    func otherVersionsAreRefused(_ json: String) throws {
        let e = try #require(throws: WireError.self) {
            try Frame(.request, ByteBuffer(string: json)).decodeRequest(DaemonRequest.self, who: "uvmd (pid 1)")
        }
        #expect(e.code == .versionMismatch)
        #expect(e.message.contains("uvmd (pid 1) speaks uvm protocol \(WireVersion.current)"))
    }

    @Test func malformedRequestsSayWhat() throws {
        let v = WireVersion.current
        for json in ["{nope", #"{"version":\#(v)}"#, #"{"version":\#(v),"op":"exec","args":{"env":[]}}"#, #"{"version":\#(v),"op":"fly","args":{}}"#] {
            let e = try #require(throws: WireError.self) { try Frame(.request, ByteBuffer(string: json)).decodeRequest(DaemonRequest.self, who: "uvmd") }
            #expect(e.code == .badRequest, "\(json)")
        }
        let e = try #require(throws: WireError.self) { try Frame(.stdin, ByteBuffer(string: "x")).decodeRequest(DaemonRequest.self, who: "uvmd") }
        #expect(e.code == .protocolError)
    }

    /// An agent of protocol 1 answered `{"ok": true}` and sent GuestInfo without a version.
    @Test func olderAnswersStillRead() throws {
        #expect(try Frame(.response, ByteBuffer(string: #"{"ok":true}"#)).decode(Done.self) == Done())
        let info = try Frame(.response, ByteBuffer(string: #"{"kernelRelease":"6.1","uptimeSeconds":1,"memTotalKiB":1,"memAvailableKiB":1,"instances":[]}"#)).decode(GuestInfo.self)
        #expect(info.protocolVersion == nil)
    }
}
