import Foundation
import Testing

extension EndToEnd {
    /// Guest networking and localhost forwarding on the real VM. Traffic stays on the host's
    /// loopback and inside QEMU's user-mode network (no DNS lookups: the host's resolver is not
    /// ours to query from tests).
    @Suite struct NetworkTests {
        static let curl = ["/usr/bin/curl", "/bin/curl"].first { FileManager.default.isExecutableFile(atPath: $0) }

        /// Runs `sh -c script` in the guest and expects it to succeed.
        @discardableResult
        func guest(_ script: String) throws -> Harness.Result {
            let r = try Harness.run(["exec", "--", "sh", "-c", script])
            #expect(r.status == 0, "guest: \(script)\nstdout: \(r.out)\nstderr: \(r.err)")
            return r
        }

        func ports() throws -> [[String: Any]] {
            let r = try Harness.run(["ports", "--format", "json"])
            #expect(r.status == 0, "stderr: \(r.err)")
            return (try? JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]]) ?? []
        }

        func download(_ port: Int, to path: String) throws -> Harness.Result {
            let curl = try #require(Self.curl, "curl is needed on the host (make setup installs it)")
            return try Harness.runProcess(curl, ["-sS", "--max-time", "120", "-o", path, "http://127.0.0.1:\(port)/file"],
                                          stdin: nil, env: Harness.environment())
        }

        @Test func guestHasAddressRouteHostnameAndResolvConf() throws {
            let r = try guest("ip -4 addr show; ip route; hostname; cat /etc/resolv.conf")
            #expect(r.out.contains("inet 10.0.2.15/24"), "\(r.out)")
            #expect(r.out.contains("default via 10.0.2.2"), "\(r.out)")
            #expect(r.out.contains("\nbusybox\n"), "\(r.out)")
            #expect(r.out.contains("nameserver 10.0.2.3"), "\(r.out)")
        }

        @Test func generateResolvConfCanBeTurnedOffPerDistro() throws {
            // Read when the instance starts, so the VM restarts in between.
            try guest("printf '[network]\\ngenerateResolvConf = false\\n' > /etc/uvm.conf; echo 'nameserver 127.0.0.53' > /etc/resolv.conf")
            _ = try Harness.run(["stop"])
            let kept = try guest("cat /etc/resolv.conf")
            #expect(kept.out == "nameserver 127.0.0.53\n")
            try guest("rm /etc/uvm.conf")
            _ = try Harness.run(["stop"])
            let generated = try guest("cat /etc/resolv.conf")
            #expect(generated.out.contains("nameserver 10.0.2.3"))
        }

        @Test func guestServerIsReachableOnHostLocalhost() throws {
            let port = 8080
            let sum = try guest("""
                mkdir -p /tmp/www && head -c 10485760 /dev/urandom > /tmp/www/file && \
                sha256sum /tmp/www/file | cut -d' ' -f1 && httpd -p \(port) -h /tmp/www
                """).out.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(sum.count == 64)
            let dir = try makeTempDir()
            defer { try? FileManager.default.removeItem(atPath: dir) }

            // Polled with a deadline; how fast it appears is measured by `make bench`.
            let reachable = try Harness.waitUntil(timeout: 30) { try download(port, to: "\(dir)/one").status == 0 }
            #expect(reachable, "127.0.0.1:\(port) never served the guest's file")
            #expect(try sha256(of: "\(dir)/one") == sum)
            // Both host loopback addresses.
            if let curl = Self.curl, hostHasIPv6Loopback() {
                let r = try Harness.runProcess(curl, ["-sS", "-g", "-o", "\(dir)/v6", "http://[::1]:\(port)/file"], stdin: nil, env: Harness.environment())
                #expect(r.status == 0, "\(r.err)")
                #expect(try sha256(of: "\(dir)/v6") == sum)
            }
            let listed = try ports().first { ($0["port"] as? Int) == port }
            #expect((listed?["guest"] as? [String: Any])?["process"] as? String == "httpd")
            #expect((listed?["guest"] as? [String: Any])?["distro"] as? String == "busybox")

            // 50 concurrent downloads, each whole and exact.
            let results = LockedResults()
            DispatchQueue.concurrentPerform(iterations: 50) { i in
                let r = try? download(port, to: "\(dir)/c\(i)")
                results.set(i, r?.status == 0 ? (try? sha256(of: "\(dir)/c\(i)")) : "failed: \(r?.err ?? "?")")
            }
            for i in 0..<50 { #expect(results.get(i) == sum, "download \(i)") }

            // Server gone: the host port is released.
            try guest("killall httpd; rm -rf /tmp/www")
            let freed = Harness.waitUntil(timeout: 30) { hostPortFree(port) }
            #expect(freed, "127.0.0.1:\(port) still taken after the guest server stopped")
            #expect(try ports().first { ($0["port"] as? Int) == port } == nil)
        }

        /// Host -> guest bytes and the host's half-close (the guest server sees EOF, then finishes).
        @Test func uploadReachesTheGuestWhole() throws {
            let port = 18082
            try guest("rm -f /tmp/up.sum /tmp/up.bin; (nc -l -p \(port) | tee /tmp/up.bin | sha256sum > /tmp/up.part && wc -c < /tmp/up.bin >> /tmp/up.part && mv /tmp/up.part /tmp/up.sum) </dev/null >/dev/null 2>&1 &")
            let dir = try makeTempDir()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            // socat sends the file, then shuts its side down; retried until the port is forwarded.
            let r = try Harness.shell("""
                head -c 20000000 /dev/urandom > \(dir)/up && sha256sum < \(dir)/up | cut -d' ' -f1 && \
                for i in $(seq 300); do socat -u FILE:\(dir)/up TCP:127.0.0.1:\(port) 2>>\(dir)/socat.err && { echo attempts=$i >&2; cat \(dir)/socat.err >&2; exit 0; }; sleep 0.1; done; exit 1
                """)
            #expect(r.status == 0, "\(r.err)")
            let sent = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
            var received = ""
            _ = try Harness.waitUntil(timeout: 60) {
                received = try Harness.run(["exec", "--", "sh", "-c", "cat /tmp/up.sum 2>/dev/null"]).out
                return !received.isEmpty
            }
            #expect(sent.count == 64)
            if !received.hasPrefix(sent) {
                let dmesg = (try? Harness.run(["exec", "--", "sh", "-c", "dmesg | tail -5"]).out) ?? ""
                Issue.record("sent \(sent) (20000000 bytes), the guest got \(received); socat: \(r.err); guest dmesg:\n\(dmesg)")
            }
            try guest("rm -f /tmp/up.sum /tmp/up.bin")
        }

        @Test func hostLoopbackServiceIsReachableFromTheGuest() throws {
            let server = try HostServer(body: "hello from the host\n")
            defer { server.stop() }
            let r = try guest("wget -q -O - http://10.0.2.2:\(server.port)/")
            #expect(r.out == "hello from the host\n")
        }

        @Test func busyHostPortIsReportedAndOthersStillForward() throws {
            let busy = try HostServer(body: "host\n")  // holds 127.0.0.1:busy.port
            defer { busy.stop() }
            let free = 18081
            try guest("""
                mkdir -p /tmp/www2 && echo guest > /tmp/www2/file && \
                httpd -p \(busy.port) -h /tmp/www2 && httpd -p \(free) -h /tmp/www2
                """)
            defer { _ = try? Harness.run(["exec", "--", "sh", "-c", "killall httpd; rm -rf /tmp/www2"]) }
            var entry: [String: Any]? = nil
            let reported = try Harness.waitUntil(timeout: 30) {
                entry = try ports().first { ($0["port"] as? Int) == Int(busy.port) }
                return entry?["error"] != nil
            }
            #expect(reported, "uvm ports does not say why \(busy.port) is not forwarded: \(String(describing: entry))")
            #expect((entry?["error"] as? String)?.contains("already in use on the host") == true)
            let text = try Harness.run(["ports"])
            #expect(text.out.contains("not forwarded"), "\(text.out)")

            let dir = try makeTempDir()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let works = try Harness.waitUntil(timeout: 30) { try download(free, to: "\(dir)/f").status == 0 }
            #expect(works)
            #expect(try String(contentsOfFile: "\(dir)/f", encoding: .utf8) == "guest\n")
            // The host's own server on the busy port still answers, not the guest's.
            let curl = try #require(Self.curl)
            let own = try Harness.runProcess(curl, ["-sS", "http://127.0.0.1:\(busy.port)/"], stdin: nil, env: Harness.environment())
            #expect(own.out == "host\n")
        }
    }
}

private final class LockedResults: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Int: String] = [:]
    func set(_ i: Int, _ v: String?) { lock.lock(); values[i] = v; lock.unlock() }
    func get(_ i: Int) -> String? { lock.lock(); defer { lock.unlock() }; return values[i] }
}

private func makeTempDir() throws -> String {
    let dir = NSTemporaryDirectory() + "uvm-net-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func sha256(of path: String) throws -> String {
    let r = try Harness.runProcess("/usr/bin/sha256sum", [path], stdin: nil, env: [:])
    return String(r.out.prefix(64))
}

/// Whether 127.0.0.1:port can be bound (SO_REUSEADDR, as servers do: TIME_WAIT does not count).
private func hostPortFree(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    } == 0
}

private func hostHasIPv6Loopback() -> Bool {
    (try? String(contentsOfFile: "/proc/net/if_inet6", encoding: .utf8))?.contains("00000000000000000000000000000001") == true
}

/// A tiny HTTP server on the host's 127.0.0.1 (an ephemeral port), one thread, same answer to all.
private final class HostServer: @unchecked Sendable {
    let fd: Int32
    let port: UInt16

    init(body: String) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else { close(fd); throw POSIXError(.EADDRINUSE) }
        port = UInt16(bigEndian: addr.sin_port)
        let response = Array("HTTP/1.0 200 OK\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)".utf8)
        let listenFD = fd
        Thread.detachNewThread {
            while true {
                let c = accept(listenFD, nil, nil)
                if c < 0 { if errno == EINTR { continue }; return }
                var buf = [UInt8](repeating: 0, count: 4096)
                _ = recv(c, &buf, buf.count, 0)
                _ = response.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                close(c)
            }
        }
    }

    func stop() {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }
}
