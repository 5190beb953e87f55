import Foundation
import Testing

extension EndToEnd {
    /// A guest that listens on more ports than uvmd forwards: each forwarded port costs uvmd two
    /// descriptors, so the guest must not be able to make it open them without bound.
    @Suite struct PortLimitTests {
        static let config = "[vm]\nvmIdleTimeout = never\n[general]\ninstanceIdleTimeout = never\n"

        static func forwarded(home: String, env: [String: String]) throws -> [Int: [String: Any]] {
            let r = try Harness.spawnRun(["ports", "--format", "json"], home: home, env: env)
            let list = (try? JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]]) ?? []
            return Dictionary(list.compactMap { p in (p["port"] as? Int).map { ($0, p) } }, uniquingKeysWith: { a, _ in a })
        }

        /// Connects to 127.0.0.1:port; true when something accepts.
        static func accepts(_ port: Int) -> Bool {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return false }
            defer { close(fd) }
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            return withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            } == 0
        }

        @Test func portsBeyondTheLimitAreListedNotForwarded() throws {
            try Harness.withConfiguredHome("port-limit", config: Self.config) { home, config in
                var env = config
                env["UVM_MAX_FORWARDED_PORTS"] = "3"
                let ports = Array(23411...23415)
                let listen = "mkdir -p /tmp/pl && " + ports.map { "httpd -p \($0) -h /tmp/pl" }.joined(separator: " && ")
                let started = try Harness.spawnRun(["exec", "--", "sh", "-c", listen], home: home, env: env)
                try #require(started.status == 0, "\(started.err)\n\(Harness.daemonLog(home))")
                let listed = try Harness.waitUntil(timeout: 60) { try Self.forwarded(home: home, env: env).count == ports.count }
                try #require(listed, "\((try? Self.forwarded(home: home, env: env)) ?? [:])\n\(Harness.daemonLog(home))")
                let table = try Self.forwarded(home: home, env: env)
                for port in ports.prefix(3) {
                    #expect((table[port]?["hostAddresses"] as? [String])?.isEmpty == false, "\(port): \(table[port] ?? [:])")
                    #expect(Self.accepts(port), "\(port) is not forwarded")
                }
                for port in ports.suffix(2) {
                    #expect((table[port]?["hostAddresses"] as? [String]) ?? [] == [], "\(port): \(table[port] ?? [:])")
                    #expect((table[port]?["error"] as? String)?.contains("more than 3 ports") == true, "\(port): \(table[port] ?? [:])")
                    #expect(!Self.accepts(port), "\(port) is forwarded beyond the limit")
                }
                // A port below goes away: the next one in line is forwarded.
                let stopped = try Harness.spawnRun(["exec", "--", "sh", "-c", "kill $(ps | awk '/httpd -p \(ports[0])/ && !/awk/ { print $1 }')"], home: home, env: env)
                #expect(stopped.status == 0, "\(stopped.err)")
                let promoted = Harness.waitUntil(timeout: 30) { Self.accepts(ports[3]) }
                #expect(promoted, "\(ports[3]) was not forwarded once a lower port closed\n\(Harness.daemonLog(home))")
                #expect(!Self.accepts(ports[4]))
                _ = try? Harness.spawnRun(["exec", "--", "sh", "-c", "killall httpd"], home: home, env: env)
            }
        }
    }
}
