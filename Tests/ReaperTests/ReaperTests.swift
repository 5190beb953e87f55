import Reaper
import Synchronization
import Testing

/// The reaper's decisions with stand-in stop actions (the real VM is in EndToEndTests.ReaperTests).
@Suite struct ReaperTests {
    final class Log: Sendable {
        let events = Mutex<[String]>([])
        func add(_ e: String) { events.withLock { $0.append(e) } }
        var all: [String] { events.withLock { $0 } }
    }

    func reaper(instance: Duration?, vm: Duration?, log: Log) async -> Reaper {
        let r = Reaper(instanceIdle: instance, vmIdle: vm)
        await r.setActions(.init(stopInstance: { log.add("instance \($0)") }, stopVM: { _ in log.add("vm") }))
        return r
    }

    func eventually(_ condition: () async -> Bool) async -> Bool {
        for _ in 0..<500 {
            if await condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return false
    }

    @Test func lastClientGoneStopsTheInstanceThenTheVM() async {
        let log = Log()
        let r = await reaper(instance: .milliseconds(20), vm: .milliseconds(20), log: log)
        let t = await r.begin(distro: "busybox")
        await r.vmStarted()
        #expect(await r.snapshot().instances.first?.clients == 1)
        await r.end(t)
        #expect(await eventually { log.all == ["instance busybox", "vm"] })
    }

    /// `[boot] keepAlive = services`: while the instance runs something, its idle stop is put off
    /// (and the VM's with it), and the snapshot says by what; once nothing is left, it stops.
    @Test func servicesKeepAnIdleInstance() async throws {
        let log = Log()
        let running = Mutex<[String]>(["docker.service"])
        let r = Reaper(instanceIdle: .milliseconds(20), vmIdle: .milliseconds(20))
        await r.setActions(.init(stopInstance: { log.add("instance \($0)") }, stopVM: { _ in log.add("vm") },
                                 keptBy: { _ in running.withLock { $0 } }))
        await r.vmStarted()
        await r.end(await r.begin(distro: "debian"))
        #expect(await eventually { await r.snapshot().instances.first?.keptBy == ["docker.service"] })
        try await Task.sleep(for: .milliseconds(100))
        #expect(log.all.isEmpty)
        #expect(await r.snapshot().vmStopDue == nil)
        running.withLock { $0 = [] }
        #expect(await eventually { log.all == ["instance debian", "vm"] })
    }

    @Test func aClientKeepsItsInstanceAndTheVM() async throws {
        let log = Log()
        let r = await reaper(instance: .milliseconds(10), vm: .milliseconds(10), log: log)
        await r.vmStarted()
        let a = await r.begin(distro: "a")
        let b = await r.begin(distro: "b")
        await r.end(a)
        #expect(await eventually { log.all == ["instance a"] })
        try await Task.sleep(for: .milliseconds(100))
        #expect(log.all == ["instance a"])  // b still has a client: no VM stop
        let snap = await r.snapshot()
        #expect(snap.instances.map(\.name) == ["b"])
        #expect(snap.vmStopDue == nil)
        await r.end(b)
        #expect(await eventually { log.all == ["instance a", "instance b", "vm"] })
    }

    @Test func aNewClientCancelsAPendingStop() async throws {
        let log = Log()
        let r = await reaper(instance: .seconds(3600), vm: .seconds(3600), log: log)
        await r.vmStarted()
        await r.end(await r.begin(distro: "a"))
        #expect(await r.snapshot().instances.first?.stopDue != nil)
        _ = await r.begin(distro: "a")
        let snap = await r.snapshot()
        #expect(snap.instances.first?.stopDue == nil)
        #expect(snap.vmStopDue == nil)
    }

    @Test func neverDisablesTheTimers() async throws {
        let log = Log()
        let r = await reaper(instance: nil, vm: .milliseconds(1), log: log)
        await r.vmStarted()
        await r.end(await r.begin(distro: "a"))
        try await Task.sleep(for: .milliseconds(100))
        #expect(log.all.isEmpty)  // the instance stays, so the VM stays
        let idleVM = await reaper(instance: .milliseconds(1), vm: nil, log: log)
        await idleVM.vmStarted()
        await idleVM.end(await idleVM.begin(distro: "a"))
        #expect(await eventually { log.all == ["instance a"] })
        try await Task.sleep(for: .milliseconds(100))
        #expect(log.all == ["instance a"])
    }

    @Test func anIdleVMWithoutInstancesStops() async {
        let log = Log()
        let r = await reaper(instance: .milliseconds(10), vm: .milliseconds(10), log: log)
        await r.vmStarted()  // `uvm start`: nobody ever used it
        #expect(await eventually { log.all == ["vm"] })
    }

    @Test func anAdoptedVMsInstancesAreReaped() async {
        let log = Log()
        let r = await reaper(instance: .milliseconds(10), vm: .milliseconds(10), log: log)
        await r.vmStarted(instances: ["busybox"])
        #expect(await eventually { log.all == ["instance busybox", "vm"] })
    }

    @Test func aStoppedVMForgetsItsInstances() async {
        let log = Log()
        let r = await reaper(instance: .seconds(3600), vm: .seconds(3600), log: log)
        await r.vmStarted()
        let t = await r.begin(distro: "a")
        await r.vmStopped()
        await r.end(t)
        let snap = await r.snapshot()
        #expect(snap.instances.isEmpty)
        #expect(snap.vmStopDue == nil)
        #expect(snap.clients == 0)
    }
}
