import CLibvirt
import Foundation

/// libvirt's virDomainState.
public enum DomainState: Sendable, Equatable {
    case noState, running, blocked, paused, shuttingDown, shutOff, crashed, pmSuspended
    case unknown(Int32)

    init(raw: Int32) {
        switch raw {
        case 0: self = .noState
        case 1: self = .running
        case 2: self = .blocked
        case 3: self = .paused
        case 4: self = .shuttingDown
        case 5: self = .shutOff
        case 6: self = .crashed
        case 7: self = .pmSuspended
        default: self = .unknown(raw)
        }
    }
}

public struct DomainInfo: Sendable, Equatable {
    public var state: DomainState
    public var maxMemoryKiB: UInt64
    public var memoryKiB: UInt64
    public var vcpus: Int
    /// CPU time used by the guest, in nanoseconds.
    public var cpuTimeNs: UInt64
}

/// A running domain. Holds its own reference to the libvirt connection, so it stays usable after
/// `LibvirtConnection.close()`.
public final class VMDomain: Sendable {
    public let name: String
    public let uuid: String
    let handle: LibvirtHandle
    private let connectionURI: String

    init(owning handle: LibvirtHandle, connectionURI: String) {
        self.handle = handle
        self.connectionURI = connectionURI
        // Both are cached in the virDomainPtr: no round trip to libvirtd.
        name = virDomainGetName(handle.pointer).map { String(cString: $0) } ?? ""
        var buf = [CChar](repeating: 0, count: 37)  // VIR_UUID_STRING_BUFLEN
        uuid = virDomainGetUUIDString(handle.pointer, &buf) == 0
            ? String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    }

    deinit { virDomainFree(handle.pointer) }

    /// Kills QEMU at once (virDomainDestroy); a `stopped` event with detail "destroyed" follows.
    public func destroy() async throws {
        try await call("destroy") { virDomainDestroy($0) }
    }

    /// The disks of the running domain as libvirt describes them: (target dev, serial) pairs.
    public func disks() async throws -> [(dev: String, serial: String?)] {
        let handle = self.handle, op = "describe \(name)", uri = connectionURI
        let xml: String = try await LibvirtRuntime.blocking {
            guard let p = virDomainGetXMLDesc(handle.pointer, 0) else { throw LibvirtError.last(operation: op, uri: uri) }
            defer { free(p) }
            return String(cString: p)
        }
        return Self.disks(inXML: xml)
    }

    /// Reads `<disk>...<target dev='X'/>...<serial>S</serial>...</disk>` without an XML parser:
    /// libvirt writes these elements one per line, attributes in single quotes.
    static func disks(inXML xml: String) -> [(dev: String, serial: String?)] {
        var out: [(String, String?)] = []
        var dev: String? = nil, serial: String? = nil, inDisk = false
        for raw in xml.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("<disk ") { inDisk = true; dev = nil; serial = nil; continue }
            guard inDisk else { continue }
            if line.hasPrefix("<target "), let r = line.range(of: "dev='") {
                dev = String(line[r.upperBound...].prefix(while: { $0 != "'" }))
            } else if line.hasPrefix("<serial>"), line.hasSuffix("</serial>") {
                serial = String(line.dropFirst(8).dropLast(9))
            } else if line == "</disk>" {
                if let dev { out.append((dev, serial)) }
                inDisk = false
            }
        }
        return out
    }

    /// Hot-plugs a device (e.g. a distro's disk) into the running VM: `xml` is one device element.
    public func attachDevice(xml: String) async throws {
        try await call("attach a device to") { virDomainAttachDeviceFlags($0, xml, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) }
    }

    /// Asks the guest to let go of a device and removes it; the guest's side may take a moment
    /// (libvirt waits a few seconds, then returns while the removal goes on).
    public func detachDevice(xml: String) async throws {
        try await call("detach a device from") { virDomainDetachDeviceFlags($0, xml, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) }
    }

    /// Presses the ACPI power button; the guest decides whether and when to power off.
    public func shutdown() async throws {
        try await call("shutdown") {
            virDomainShutdownFlags($0, VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN.rawValue)
        }
    }

    public func info() async throws -> DomainInfo {
        let handle = self.handle
        let op = "get info of \(name)"
        let uri = connectionURI
        return try await LibvirtRuntime.blocking {
            var raw = virDomainInfo()
            if virDomainGetInfo(handle.pointer, &raw) < 0 {
                throw LibvirtError.last(operation: op, uri: uri)
            }
            return DomainInfo(
                state: DomainState(raw: Int32(raw.state)), maxMemoryKiB: UInt64(raw.maxMem),
                memoryKiB: UInt64(raw.memory), vcpus: Int(raw.nrVirtCpu), cpuTimeNs: UInt64(raw.cpuTime))
        }
    }

    /// QEMU's pid, from the pid file libvirt's QEMU driver writes, when QEMU runs on this host and
    /// is alive. nil for remote URIs or once QEMU has exited.
    public func qemuPID() -> pid_t? {
        for path in Self.pidFileCandidates(connectionURI: connectionURI, name: name) {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8),
                let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0
            else { continue }
            // A stale file (QEMU killed behind libvirt's back) must not yield a recycled pid's owner.
            if Self.isRunning(pid), Self.isQEMU(pid) { return pid }
        }
        return nil
    }

    /// qemu:///system: /run/libvirt/qemu/NAME.pid. qemu:///session: the session daemon's
    /// $XDG_RUNTIME_DIR/libvirt/qemu/run (GLib falls back to ~/.cache without XDG_RUNTIME_DIR).
    static func pidFileCandidates(connectionURI: String, name: String) -> [String] {
        guard let url = URL(string: connectionURI), url.scheme?.hasPrefix("qemu") == true,
            url.host == nil || url.host == "" || url.host == "localhost"
        else { return [] }
        switch url.path {
        case "/system":
            return ["/run/libvirt/qemu/\(name).pid"]
        case "/session":
            var dirs: [String] = []
            if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty {
                dirs.append(runtime)
            }
            dirs.append(NSHomeDirectory() + "/.cache")
            return dirs.map { "\($0)/libvirt/qemu/run/\(name).pid" }
        default:
            return []
        }
    }

    /// Alive and not a zombie: QEMU is daemonized, so its parent is PID 1, and a slow init (as in
    /// some containers) leaves it a zombie for a while after it exited.
    private static func isRunning(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        return !stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
    }

    private static func isQEMU(_ pid: pid_t) -> Bool {
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe") else {
            return true  // not ours to read (another user's QEMU): trust libvirt's pid file
        }
        return exe.contains("qemu")
    }

    private func call(_ what: String, _ body: @escaping @Sendable (OpaquePointer) -> Int32) async throws {
        let handle = self.handle
        let op = "\(what) \(name)"
        let uri = connectionURI
        try await LibvirtRuntime.blocking {
            if body(handle.pointer) < 0 { throw LibvirtError.last(operation: op, uri: uri) }
        }
    }
}
