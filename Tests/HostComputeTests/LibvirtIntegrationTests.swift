import Foundation
import Synchronization
import Testing

@testable import HostCompute

/// Collects every event of a stream with its arrival time, so a test can wait for several in turn.
final class EventRecorder: Sendable {
    private let seen = Mutex<[(DomainEvent, ContinuousClock.Instant)]>([])
    private let task = Mutex<Task<Void, Never>?>(nil)

    init(_ stream: AsyncStream<DomainEvent>) {
        task.withLock { $0 = Task { [weak self] in for await e in stream { self?.append(e) } } }
    }

    deinit { task.withLock { $0?.cancel() } }

    private func append(_ e: DomainEvent) { seen.withLock { $0.append((e, .now)) } }

    /// Waits (up to `timeout`) for the first event matching `match`; returns it and when it arrived.
    func wait(
        for timeout: Duration = .seconds(30), _ match: @escaping @Sendable (DomainEvent) -> Bool
    ) async -> (DomainEvent, ContinuousClock.Instant)? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let hit = seen.withLock({ $0.first { match($0.0) } }) { return hit }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return nil
    }

    func all() -> [DomainEvent] { seen.withLock { $0.map(\.0) } }
}

func ms(_ d: Duration) -> String {
    let (s, atto) = d.components
    return String(format: "%.1f ms", Double(s) * 1000 + Double(atto) / 1e15)
}

@Suite(.serialized) struct LibvirtIntegrationTests {
    /// The daemon this account uses: qemu:///session for an ordinary user (qemu:///system would
    /// need polkit and a system bus), qemu:///system for root.
    static let uri = LibvirtConnection.defaultURI

    /// Opens the real daemon, or cancels the test when (and only when) libvirtd is not reachable.
    func openOrSkip() async throws -> (LibvirtConnection, Duration) {
        let clock = ContinuousClock()
        let start = clock.now
        do {
            let conn = try await LibvirtConnection.open(uri: Self.uri)
            return (conn, clock.now - start)
        } catch let error as LibvirtError where error.kind == .daemonUnreachable {
            try Test.cancel("libvirtd is not reachable: \(error)")
        }
    }

    @Test func unreachableDaemonSaysHowToStartIt() async throws {
        let error = await #expect(throws: LibvirtError.self) {
            _ = try await LibvirtConnection.open(uri: "qemu:///system?socket=/nonexistent/libvirt-sock")
        }
        #expect(error?.kind == .daemonUnreachable)
        #expect(error?.description.contains("virtlogd -d && libvirtd -d") == true)
        #expect(error?.description.contains("qemu:///system") == true)
    }

    @Test func badXMLIsALibvirtErrorWithItsMessage() async throws {
        let (conn, _) = try await openOrSkip()
        defer { conn.close() }
        let error = await #expect(throws: LibvirtError.self) {
            _ = try await conn.createTransient(xml: "<domain type='qemu'><name>x</name></domain>")
        }
        #expect(error?.kind == .failed)
        #expect(error?.message.isEmpty == false)
        #expect(try await conn.lookup(name: "uvm-no-such-domain-\(getpid())") == nil)
    }

    @Test func closeEndsTheEventStreams() async throws {
        let (conn, _) = try await openOrSkip()
        let stream = conn.events
        conn.close()
        for await e in stream { Issue.record("unexpected event \(e)") }
        conn.close()  // idempotent
    }

    /// A kernel-less TCG domain (QEMU sits in SeaBIOS) driven through the whole lifecycle.
    @Test func transientDomainLifecycle() async throws {
        let (conn, openTime) = try await openOrSkip()
        defer { conn.close() }

        // QEMU must be able to create the socket and log here; 0755 keeps that true even for a
        // non-root QEMU identity.
        var template = Array("/tmp/uvm-hc-XXXXXX".utf8CString)
        let dir = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
            .map { String(cString: $0) })
        chmod(dir, 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }

        let name = "uvm-hctest-\(getpid())"
        let spec = VMSpec(
            name: name, accelerator: .tcg, memoryMiB: 128, vcpus: 1,
            channels: [.init(name: "uvm.control", socketPath: "\(dir)/control.sock")],
            consoleLog: "\(dir)/console.log", userNetwork: true)

        let recorder = EventRecorder(conn.events)
        let clock = ContinuousClock()
        let createStart = clock.now
        let domain = try await conn.createTransient(xml: domainXML(for: spec))
        let created = clock.now
        var destroyed = false
        defer {
            // Never leave a QEMU behind when an expectation throws.
            if !destroyed {
                let d = domain
                Task { try? await d.destroy() }
            }
        }

        #expect(domain.name == name)
        #expect(domain.uuid.count == 36)

        let started = await recorder.wait { $0.domainName == name && $0.kind == .started }
        let startedEvent = try #require(started, "no started event; saw \(recorder.all())")
        #expect(startedEvent.0.detail == "booted")

        let pid = try #require(domain.qemuPID())
        #expect(kill(pid, 0) == 0)

        let info = try await domain.info()
        #expect(info.state == .running)
        #expect(info.vcpus == 1)
        #expect(info.maxMemoryKiB == 128 * 1024)

        let found = try #require(try await conn.lookup(name: name))
        #expect(found.uuid == domain.uuid)
        #expect(found.qemuPID() == pid)

        // libvirt hands QEMU the bound channel socket and the log file before the domain runs.
        #expect(FileManager.default.fileExists(atPath: "\(dir)/control.sock"))
        #expect(FileManager.default.fileExists(atPath: "\(dir)/console.log"))

        let destroyStart = clock.now
        try await domain.destroy()
        let destroyReturned = clock.now
        destroyed = true
        let stopped = await recorder.wait { $0.domainName == name && $0.kind == .stopped }
        let stoppedEvent = try #require(stopped, "no stopped event; saw \(recorder.all())")
        #expect(stoppedEvent.0.detail == "destroyed")

        // libvirtd reaps QEMU; allow it a moment.
        let gone = clock.now + .seconds(5)
        while kill(pid, 0) == 0 && clock.now < gone { try await Task.sleep(for: .milliseconds(20)) }
        #expect(kill(pid, 0) == -1 && errno == ESRCH)
        #expect(domain.qemuPID() == nil)
        #expect(try await conn.lookup(name: name) == nil)

        print(
            "HostCompute timings: virConnectOpen \(ms(openTime)), createTransient \(ms(created - createStart)), "
                + "createTransient return -> started event \(ms(startedEvent.1 - created)), "
                + "destroy \(ms(destroyReturned - destroyStart)), "
                + "destroy return -> stopped event \(ms(stoppedEvent.1 - destroyReturned))")
    }
}
