import CLibvirt
import Foundation
import Logging
import Synchronization

/// A lifecycle change of a domain, or the loss of the connection itself.
public struct DomainEvent: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case started, stopped, shutdown, crashed, suspended, resumed
        /// defined/undefined/pmsuspended: not interesting for transient utility VMs.
        case other
        /// libvirtd went away or the connection failed; `domainName` is empty and no further events
        /// follow on this connection.
        case connectionClosed
    }

    public var domainName: String
    /// Tells apart successive transient domains of the same name (each creation gets a new UUID).
    public var domainUUID: String = ""
    public var kind: Kind
    /// libvirt's detail in words, e.g. "destroyed", "booted", "crashed".
    public var detail: String
    /// The raw virDomainEventType and detail, for logs.
    public var rawEvent: Int32
    public var rawDetail: Int32

    public init(domainName: String, kind: Kind, detail: String, rawEvent: Int32 = -1, rawDetail: Int32 = -1) {
        self.domainName = domainName
        self.kind = kind
        self.detail = detail
        self.rawEvent = rawEvent
        self.rawDetail = rawDetail
    }

    public var description: String {
        kind == .connectionClosed ? "connection closed (\(detail))" : "\(domainName): \(kind.rawValue) (\(detail))"
    }

    /// Maps libvirt's VIR_DOMAIN_EVENT_* and their detail enums (stable ABI numbers).
    init(domainName: String, event: Int32, detail: Int32) {
        func word(_ names: [String]) -> String {
            names.indices.contains(Int(detail)) ? names[Int(detail)] : "detail \(detail)"
        }
        let kind: Kind
        let text: String
        switch event {
        case 0: (kind, text) = (.other, "defined")
        case 1: (kind, text) = (.other, "undefined")
        case 2: (kind, text) = (.started, word(["booted", "migrated", "restored", "from snapshot", "wakeup"]))
        case 3:
            (kind, text) = (.suspended, word([
                "paused", "migrated", "I/O error", "watchdog", "restored", "from snapshot", "API error",
                "postcopy", "postcopy failed",
            ]))
        case 4: (kind, text) = (.resumed, word(["unpaused", "migrated", "from snapshot", "postcopy", "postcopy failed"]))
        case 5:
            (kind, text) = (.stopped, word([
                "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot",
            ]))
        case 6: (kind, text) = (.shutdown, word(["finished", "guest", "host"]))
        case 7: (kind, text) = (.other, "pmsuspended")
        case 8: (kind, text) = (.crashed, word(["panicked", "crashloaded"]))
        default: (kind, text) = (.other, "event \(event)")
        }
        self.init(domainName: domainName, kind: kind, detail: text, rawEvent: event, rawDetail: detail)
    }
}

/// Fans libvirt's callbacks out to every `events` stream. Retained by libvirt (through the opaque
/// pointer) until it calls the free callback, so it may outlive the connection object.
final class EventSink: Sendable {
    private struct State {
        var next = 0
        var subscribers: [Int: AsyncStream<DomainEvent>.Continuation] = [:]
        var finished = false
    }
    private let state = Mutex(State())

    func subscribe() -> AsyncStream<DomainEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: DomainEvent.self)
        let id: Int? = state.withLock { s in
            if s.finished { return nil }
            s.next += 1
            s.subscribers[s.next] = continuation
            return s.next
        }
        guard let id else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    // Continuations are used outside the lock: finish() runs onTermination synchronously, which
    // takes the lock again.
    func yield(_ event: DomainEvent) {
        for c in state.withLock({ Array($0.subscribers.values) }) { c.yield(event) }
    }

    func finish(with last: DomainEvent? = nil) {
        let subscribers = state.withLock { s in
            defer { s.subscribers = [:] }
            if s.finished { return [AsyncStream<DomainEvent>.Continuation]() }
            s.finished = true
            return Array(s.subscribers.values)
        }
        for c in subscribers {
            if let last { c.yield(last) }
            c.finish()
        }
    }
}

// C callbacks: they capture nothing; the sink comes through the opaque pointer.

private func lifecycleCallback(
    _ conn: OpaquePointer?, _ dom: OpaquePointer?, _ event: Int32, _ detail: Int32, _ opaque: UnsafeMutableRawPointer?
) -> Int32 {
    guard let dom, let opaque else { return 0 }
    let sink = Unmanaged<EventSink>.fromOpaque(opaque).takeUnretainedValue()
    let name = virDomainGetName(dom).map { String(cString: $0) } ?? ""
    var event = DomainEvent(domainName: name, event: event, detail: detail)
    var buf = [CChar](repeating: 0, count: 37)  // VIR_UUID_STRING_BUFLEN
    if virDomainGetUUIDString(dom, &buf) == 0 {
        event.domainUUID = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    sink.yield(event)
    return 0
}

private func closeCallback(_ conn: OpaquePointer?, _ reason: Int32, _ opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    let sink = Unmanaged<EventSink>.fromOpaque(opaque).takeUnretainedValue()
    let why: String
    switch UInt32(bitPattern: reason) {
    case VIR_CONNECT_CLOSE_REASON_EOF.rawValue: why = "libvirtd closed the connection"
    case VIR_CONNECT_CLOSE_REASON_KEEPALIVE.rawValue: why = "libvirtd stopped answering keepalives"
    case VIR_CONNECT_CLOSE_REASON_ERROR.rawValue: why = "connection error"
    default: why = "closed by the client"
    }
    sink.finish(with: DomainEvent(domainName: "", kind: .connectionClosed, detail: why))
}

private func releaseSink(_ opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    Unmanaged<EventSink>.fromOpaque(opaque).release()
}

/// One connection to libvirt. Thread-safe: libvirt locks its connection objects internally, and
/// blocking calls run on NIO's thread pool, never on Swift's cooperative threads.
public final class LibvirtConnection: Sendable {
    /// qemu:///system for root, qemu:///session otherwise (design.md).
    public static var defaultURI: String { getuid() == 0 ? "qemu:///system" : "qemu:///session" }

    /// The URI libvirt reports for this connection (normalized, e.g. "qemu:///system").
    public let uri: String
    let handle: LibvirtHandle
    private let sink: EventSink
    private let lifecycleCallbackID: Int32
    private let closed = Mutex(false)
    private static let logger = Logger(label: "uvm.hostcompute.libvirt")

    private init(handle: LibvirtHandle, uri: String, sink: EventSink, lifecycleCallbackID: Int32) {
        self.handle = handle
        self.uri = uri
        self.sink = sink
        self.lifecycleCallbackID = lifecycleCallbackID
    }

    deinit { close() }

    /// Connects to libvirt (about 30 ms on a healthy host, off the cooperative pool). Throws
    /// `LibvirtError` with kind `.daemonUnreachable` when nothing listens at the URI's socket.
    public static func open(uri: String = defaultURI) async throws -> LibvirtConnection {
        LibvirtRuntime.start()
        return try await LibvirtRuntime.blocking {
            guard let conn = virConnectOpen(uri) else {
                throw LibvirtError.last(operation: "connect", uri: uri, opening: true)
            }
            let handle = LibvirtHandle(pointer: conn)
            let actualURI = virConnectGetURI(conn).map { p in defer { free(p) }; return String(cString: p) } ?? uri
            do {
                return try LibvirtConnection(registeringOn: handle, uri: actualURI)
            } catch {
                virConnectClose(conn)
                throw error
            }
        }
    }

    private convenience init(registeringOn handle: LibvirtHandle, uri: String) throws {
        let conn = handle.pointer
        let sink = EventSink()

        // Notice a dead or hung libvirtd: ping every 5 s, give up after 3 missed answers. Returns 1
        // when the other side does not support keepalive, which is not an error.
        if virConnectSetKeepAlive(conn, 5, 3) < 0 {
            throw LibvirtError.last(operation: "enable keepalive", uri: uri)
        }
        let onClose: @convention(c) (OpaquePointer?, Int32, UnsafeMutableRawPointer?) -> Void = closeCallback
        let release: @convention(c) (UnsafeMutableRawPointer?) -> Void = releaseSink
        let closeOpaque = Unmanaged.passRetained(sink).toOpaque()
        if virConnectRegisterCloseCallback(conn, onClose, closeOpaque, release) < 0 {
            Unmanaged<EventSink>.fromOpaque(closeOpaque).release()
            throw LibvirtError.last(operation: "register close callback", uri: uri)
        }

        // libvirt's API takes the generic callback type and calls it with the lifecycle signature
        // (VIR_DOMAIN_EVENT_CALLBACK in C is the same cast).
        let onLifecycle: @convention(c) (OpaquePointer?, OpaquePointer?, Int32, Int32, UnsafeMutableRawPointer?) -> Int32 =
            lifecycleCallback
        let eventOpaque = Unmanaged.passRetained(sink).toOpaque()
        let id = virConnectDomainEventRegisterAny(
            conn, nil, Int32(VIR_DOMAIN_EVENT_ID_LIFECYCLE.rawValue),
            unsafeBitCast(onLifecycle, to: virConnectDomainEventGenericCallback.self),
            eventOpaque, release)
        if id < 0 {
            let error = LibvirtError.last(operation: "register lifecycle events", uri: uri)
            Unmanaged<EventSink>.fromOpaque(eventOpaque).release()
            virConnectUnregisterCloseCallback(conn, onClose)
            throw error
        }
        self.init(handle: handle, uri: uri, sink: sink, lifecycleCallbackID: id)
    }

    /// Lifecycle events of all domains on this connection, delivered by libvirt's event loop (no
    /// polling). Each access returns a new stream that sees events from that moment on, so
    /// subscribe before creating the domain you wait for. The stream ends after a
    /// `.connectionClosed` event, or when `close()` is called.
    public var events: AsyncStream<DomainEvent> { sink.subscribe() }

    /// Starts a transient domain (virDomainCreateXML): it exists until destroyed or powered off and
    /// leaves no definition behind. `autoDestroy` makes libvirt destroy it when this connection
    /// closes (also when uvmd dies); without it, a new uvmd can adopt it with `lookup(name:)`.
    public func createTransient(xml: String, autoDestroy: Bool = false) async throws -> VMDomain {
        let handle = self.handle
        let uri = self.uri
        let flags = autoDestroy ? VIR_DOMAIN_START_AUTODESTROY.rawValue : 0
        return try await LibvirtRuntime.blocking {
            guard let dom = virDomainCreateXML(handle.pointer, xml, flags) else {
                throw LibvirtError.last(operation: "create domain", uri: uri)
            }
            return VMDomain(owning: LibvirtHandle(pointer: dom), connectionURI: uri)
        }
    }

    /// The running domain called `name`, or nil when there is none (e.g. a VM a previous uvmd
    /// left behind).
    public func lookup(name: String) async throws -> VMDomain? {
        let handle = self.handle
        let uri = self.uri
        return try await LibvirtRuntime.blocking {
            guard let dom = virDomainLookupByName(handle.pointer, name) else {
                let error = LibvirtError.last(operation: "look up domain \(name)", uri: uri)
                if error.kind == .noDomain { return nil }
                throw error
            }
            return VMDomain(owning: LibvirtHandle(pointer: dom), connectionURI: uri)
        }
    }

    /// Stops event delivery (ending every `events` stream) and drops this object's reference to
    /// the connection; libvirt closes the socket once no VMDomain uses it either. Idempotent.
    public func close() {
        let wasClosed = closed.withLock { c in
            defer { c = true }
            return c
        }
        if wasClosed { return }
        let conn = handle.pointer
        // Fails harmlessly when libvirtd is already gone.
        if virConnectDomainEventDeregisterAny(conn, lifecycleCallbackID) < 0 { virResetLastError() }
        let onClose: @convention(c) (OpaquePointer?, Int32, UnsafeMutableRawPointer?) -> Void = closeCallback
        if virConnectUnregisterCloseCallback(conn, onClose) < 0 { virResetLastError() }
        if virConnectClose(conn) < 0 { virResetLastError() }
        sink.finish()
        Self.logger.debug("closed libvirt connection", metadata: ["uri": "\(uri)"])
    }
}
