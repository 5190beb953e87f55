import CSyscalls
import Glibc
import NIOCore
import Wire

/// WSL's localhost port tracker, for uvm: polls the kernel for listening TCP sockets and reports
/// the ports listening on a loopback or wildcard address to uvmd, which forwards them from the
/// host's loopback. Instances share the VM's network namespace, so one query covers all of
/// them; the owning process (and so the distro) is found through the socket's inode.
struct PortTracker {
    let instances: Instances
    /// Well under the "about a second" users expect; one poll is two netlink round trips.
    static let interval: Duration = .milliseconds(250)

    /// Sends a snapshot (`event` frame with `[ListeningPort]`) at once and whenever it changes,
    /// until uvmd ends the session.
    func watch(rest: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { for await _ in rest {} }
            group.addTask {
                var owners = OwnerCache()
                var last: [ListeningPort]? = nil
                while !Task.isCancelled {
                    let sockets = Self.listeningSockets()
                    let ports = await owners.describe(sockets, instances: instances)
                    if ports != last {
                        try await outbound.write(.json(.event, ports))
                        last = ports
                    }
                    try await Task.sleep(for: Self.interval)
                }
            }
            try await group.next()
            group.cancelAll()
        }
        try await outbound.write(.json(.response, [String: Bool]()))
    }

    struct Socket: Hashable {
        var port: UInt16
        var address: String
        var inode: UInt64
    }

    /// LISTEN sockets on 0.0.0.0, 127.0.0.1, :: or ::1 (v4-mapped included), from NETLINK_SOCK_DIAG;
    /// /proc/net/tcp{,6} when that fails (a kernel without INET_DIAG).
    static func listeningSockets() -> [Socket] {
        var buf = [uvm_listener](repeating: uvm_listener(), count: 256)
        var n = Int(uvm_tcp_listeners(&buf, Int32(buf.count)))
        if n > buf.count {
            buf = [uvm_listener](repeating: uvm_listener(), count: n + 64)
            n = Int(uvm_tcp_listeners(&buf, Int32(buf.count)))
        }
        guard n >= 0 else { return fromProc() }
        return buf.prefix(min(n, buf.count)).compactMap { l in
            let a = withUnsafeBytes(of: l.addr) { Array($0) }
            let address: String?
            if l.family == AF_INET {
                address = a[0..<4] == [0, 0, 0, 0] ? "0.0.0.0" : a[0..<4] == [127, 0, 0, 1] ? "127.0.0.1" : nil
            } else if a[0..<10].allSatisfy({ $0 == 0 }) {
                let tail = Array(a[10..<16])
                address = tail == [0, 0, 0, 0, 0, 0] ? "::" : tail == [0, 0, 0, 0, 0, 1] ? "::1"
                    : tail == [255, 255, 127, 0, 0, 1] ? "127.0.0.1" : nil
            } else {
                address = nil
            }
            guard let address else { return nil }
            return Socket(port: l.port, address: address, inode: l.inode)
        }
    }

    static func fromProc() -> [Socket] {
        var out: [Socket] = []
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            guard let text = readSmallFile(file, limit: 8 << 20) else { continue }
            for line in text.utf8.split(separator: UInt8(ascii: "\n")).dropFirst() {
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let f = line.split(separator: UInt8(ascii: " "), maxSplits: 10, omittingEmptySubsequences: true)
                guard f.count >= 10, f[3].elementsEqual("0A".utf8) else { continue }
                let local = f[1].split(separator: UInt8(ascii: ":"))
                guard local.count == 2,
                      let port = UInt16(String(decoding: local[1], as: UTF8.self), radix: 16),
                      let address = loopbackOrWildcard(String(decoding: local[0], as: UTF8.self)),
                      let inode = UInt64(String(decoding: f[9], as: UTF8.self)) else { continue }
                out.append(Socket(port: port, address: address, inode: inode))
            }
        }
        return out
    }

    /// The kernel prints addresses as 32-bit words in host byte order (little-endian here).
    static func loopbackOrWildcard(_ hex: String) -> String? {
        switch hex.uppercased() {
        case "00000000": return "0.0.0.0"
        case "0100007F": return "127.0.0.1"
        case "00000000000000000000000000000000": return "::"
        case "00000000000000000000000001000000": return "::1"
        case "0000000000000000FFFF00000100007F": return "127.0.0.1"
        default: return nil
        }
    }
}

/// Who owns a listening socket: found by scanning /proc/*/fd once per new socket inode.
struct OwnerCache {
    struct Owner: Equatable { var distro: String?; var pid: Int32?; var process: String? }
    private var byInode: [UInt64: Owner] = [:]

    mutating func describe(_ sockets: [PortTracker.Socket], instances: Instances) async -> [ListeningPort] {
        let inodes = Set(sockets.map(\.inode))
        byInode = byInode.filter { inodes.contains($0.key) }
        let unknown = inodes.subtracting(byInode.keys)
        if !unknown.isEmpty {
            let found = Self.scan(for: unknown, instances: await instances.all)
            for inode in unknown { byInode[inode] = found[inode] ?? Owner() }
        }
        var byPort: [UInt16: ListeningPort] = [:]
        for s in sockets.sorted(by: { ($0.port, $0.address) < ($1.port, $1.address) }) {
            let owner = byInode[s.inode] ?? Owner()
            if var p = byPort[s.port] {
                if !p.addresses.contains(s.address) { p.addresses.append(s.address) }
                if p.pid == nil { (p.distro, p.pid, p.process) = (owner.distro, owner.pid, owner.process) }
                byPort[s.port] = p
            } else {
                byPort[s.port] = ListeningPort(port: s.port, addresses: [s.address], distro: owner.distro,
                                               pid: owner.pid, process: owner.process)
            }
        }
        return byPort.keys.sorted().map { byPort[$0]! }
    }

    static func scan(for inodes: Set<UInt64>, instances: [Instance]) -> [UInt64: Owner] {
        var pidNamespaces: [String: String] = [:]
        for i in instances {
            if let ns = readLink("/proc/\(i.initPID)/ns/pid") { pidNamespaces[ns] = i.name }
        }
        var result: [UInt64: Owner] = [:]
        guard let proc = opendir("/proc") else { return result }
        defer { closedir(proc) }
        while result.count < inodes.count, let e = readdir(proc) {
            let name = direntName(e)
            guard let pid = Int32(name), let fds = opendir("/proc/\(pid)/fd") else { continue }
            defer { closedir(fds) }
            while let f = readdir(fds) {
                guard let link = readLink("/proc/\(pid)/fd/\(direntName(f))"), link.hasPrefix("socket:["),
                      let inode = UInt64(link.dropFirst(8).dropLast()), inodes.contains(inode), result[inode] == nil
                else { continue }
                let status = readSmallFile("/proc/\(pid)/status") ?? ""
                // NSpid: the pid in each nested namespace; the last is the distro's view.
                let nspid = status.split(separator: "\n").first { $0.hasPrefix("NSpid:") }?
                    .split(whereSeparator: { $0 == " " || $0 == "\t" }).last.flatMap { Int32($0) }
                let distro = readLink("/proc/\(pid)/ns/pid").flatMap { pidNamespaces[$0] }
                result[inode] = Owner(distro: distro, pid: nspid ?? pid,
                                      process: readSmallFile("/proc/\(pid)/comm")?.trimmed)
            }
        }
        return result
    }
}

func direntName(_ e: UnsafeMutablePointer<dirent>) -> String {
    withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
}

func readLink(_ path: String) -> String? {
    var buf = [CChar](repeating: 0, count: 256)
    let n = readlink(path, &buf, buf.count - 1)
    guard n > 0 else { return nil }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
