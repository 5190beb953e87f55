@testable import Daemon
import Foundation
import Glibc
import Logging
import Plan9
import Settings
import Testing
import Wire

/// Shares as uvmd runs them, against a fake agent and a fake QEMU (listening where QEMU's
/// virtio-serial chardevs would): every share is served and mounted when the VM starts, a share
/// added or removed while it runs is mounted or unmounted at once, and a failure is reported
/// per share.
@Suite struct ShareServiceTests {
    /// A state directory with QEMU's 9P port sockets listening, and a folder to share.
    final class Host: @unchecked Sendable {
        let dir: String
        let paths: Paths
        let folder: String
        var listeners: [Int32] = []

        init() throws {
            dir = NSTemporaryDirectory() + "uvm-daemon-\(getpid())-\(UUID().uuidString.prefix(8))"
            paths = Paths(home: nil, stateDir: dir + "/state", dataDir: dir + "/data", cacheDir: dir + "/cache", configFile: dir + "/uvm.conf")
            folder = dir + "/folder"
            for d in [paths.runDir, paths.dataDir, folder] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
            try "hello".write(toFile: folder + "/hello.txt", atomically: true, encoding: .utf8)
            for slot in 0..<ShareService.portCount {
                let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                var addr = sockaddr_un()
                addr.sun_family = sa_family_t(AF_UNIX)
                let p = Array(paths.ninePSocket(slot).utf8)
                withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: p); $0[p.count] = 0 }
                let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
                guard rc == 0, listen(fd, 4) == 0 else { throw WireError(.internalError, "fake QEMU socket: \(errno)") }
                listeners.append(fd)
            }
        }

        /// The guest's end of port `name` (uvm.9p.N) once uvmd's server has connected to it.
        func accept(port name: String) async throws -> Int32 {
            guard let slot = Int(name.split(separator: ".").last ?? ""), listeners.indices.contains(slot) else {
                throw WireError(.badRequest, "no port \(name)")
            }
            for _ in 0..<500 {
                let fd = Glibc.accept(listeners[slot], nil, nil)
                if fd >= 0 {
                    // Accepted sockets do not inherit O_NONBLOCK on Linux; NIO sets it itself.
                    return fd
                }
                try await Task.sleep(for: .milliseconds(10))
            }
            throw WireError(.internalError, "uvmd never connected to \(name)")
        }

        deinit {
            listeners.forEach { close($0) }
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    func service(_ host: Host) -> ShareService {
        var settings = Settings()
        settings.homeShare = nil
        return ShareService(paths: host.paths, settings: settings, logger: Logger(label: "test"))
    }

    /// The guest's 9P connections, by share, held while mounted (as the kernel holds them).
    actor Mounts {
        var clients: [String: Plan9Client] = [:]
        func add(_ name: String, _ c: Plan9Client) { clients[name] = c }
        func remove(_ name: String) async { await clients.removeValue(forKey: name)?.close() }
    }

    /// Mounts as the guest would: attaches through the port and looks up hello.txt.
    static func mountingAgent(_ host: Host) async throws -> FakeAgent {
        let mounts = Mounts()
        return try await FakeAgent.start { request, _, outbound in
            switch request {
            case .mount(let m):
                let fd = try await host.accept(port: m.port)
                let client = try await Plan9Client.connect(socket: fd)
                _ = try await client.version()
                _ = try await client.attach(fid: 0)
                let walked = try await client.call(.twalk(fid: 0, newfid: 1, names: ["hello.txt"]))
                guard case .rwalk(let qids) = walked, qids.count == 1 else { throw WireError(.internalError, "walk: \(walked)") }
                await mounts.add(m.name, client)
                try await outbound.write(.json(.response, Done()))
            case .unmount(let u):
                await mounts.remove(u.name)
                try await outbound.write(.json(.response, Done()))
            default:
                throw WireError(.badRequest, "unexpected \(request.op)")
            }
        }
    }

    @Test func sharesAreServedAndMountedWhileTheVMRuns() async throws {
        let host = try Host()
        let agent = try await Self.mountingAgent(host)
        defer { agent.close() }
        let shares = service(host)
        // Before the VM: remembered, pending.
        let added = try await shares.add(ShareSpec(name: "src", path: host.folder, readOnly: true))
        #expect(added.state.hasPrefix("pending"))

        await shares.vmStarted(agent: agent.client, transport: nil)
        #expect(try await shares.list().map(\.state) == ["mounted"])
        guard case .mount(let m) = try #require(agent.requests.last) else { Issue.record("no mount: \(agent.requests)"); return }
        #expect(m.name == "src" && m.readOnly && m.channel == nil && m.port == "uvm.9p.0")

        // Added while running: mounted at once.
        let second = try await shares.add(ShareSpec(name: "more", path: host.folder))
        #expect(second.state == "mounted")
        guard case .mount(let m2) = try #require(agent.requests.last) else { Issue.record("no mount: \(agent.requests)"); return }
        #expect(m2.name == "more" && m2.port == "uvm.9p.1")

        try await shares.remove("src")
        #expect(agent.requests.contains(.unmount(UnmountRequest(name: "src"))))
        #expect(try await shares.list().map(\.share.name) == ["more"])
        #expect(await shares.exporter.exported == ["more"])

        await shares.vmStopped()
        #expect(try await shares.list().map(\.state).allSatisfy { $0.hasPrefix("pending") })
    }

    /// The guest cannot mount one share: that share says why, its port is free again, and the
    /// others are mounted all the same.
    @Test func aFailedMountIsReportedPerShare() async throws {
        let host = try Host()
        let agent = try await FakeAgent.start { request, _, outbound in
            guard case .mount(let m) = request else { throw WireError(.badRequest, "unexpected") }
            if m.name == "bad" { throw WireError(.internalError, "share bad: mount failed: No such device") }
            _ = try await host.accept(port: m.port)
            try await outbound.write(.json(.response, Done()))
        }
        defer { agent.close() }
        let shares = service(host)
        _ = try await shares.add(ShareSpec(name: "bad", path: host.folder))
        _ = try await shares.add(ShareSpec(name: "good", path: host.folder))
        await shares.vmStarted(agent: agent.client, transport: nil)
        let states = Dictionary(uniqueKeysWithValues: try await shares.list().map { ($0.share.name, $0.state) })
        #expect(states["good"] == "mounted")
        #expect(states["bad"]?.hasPrefix("failed: ") == true && states["bad"]?.contains("No such device") == true)
        #expect(await shares.exporter.exported == ["good"])
    }

    /// A VM left by another uvm version (its agent predates versioning): nothing but `info`
    /// and `shutdown` is sent to it, and each share says what to do.
    @Test func anAgentOfAnotherVersionGetsNoMounts() async throws {
        let host = try Host()
        let agent = try await FakeAgent.start(version: nil) { _, _, _ in throw WireError(.internalError, "must not be called") }
        defer { agent.close() }
        #expect(agent.client.incompatibility?.code == .versionMismatch)
        let shares = service(host)
        _ = try await shares.add(ShareSpec(name: "src", path: host.folder))
        await shares.vmStarted(agent: agent.client, transport: nil)
        let state = try #require(try await shares.list().first?.state)
        #expect(state.contains("another uvm version") && state.contains("uvm stop"))
        #expect(agent.requests == [.info(InfoRequest())])
    }
}
