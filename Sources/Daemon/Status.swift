import Distros
import Foundation
import Reaper
import Settings
import Wire

extension UVMDaemon {
    /// `uvm status` and `uvm list`: the VM, the reaper's clients and timers, every installed distro.
    func status() async -> VMStatus {
        let snap = await reaper.snapshot()
        var s = await controller.status(daemonRSSKiB: residentKiB(), sessions: snap.clients)
        let now = ContinuousClock.now
        func seconds(_ due: ContinuousClock.Instant?) -> Double? {
            guard let due else { return nil }
            return max(0, (due - now).inSeconds)
        }
        s.clients = snap.clients
        s.idleStopInSeconds = seconds(snap.vmStopDue)
        s.vmIdleTimeout = formatTimeout(settings.vmIdleTimeout)
        s.instanceIdleTimeout = formatTimeout(settings.instanceIdleTimeout)
        let vmUp = s.state == "Running"
        var instances: [InstanceStatus] = []
        let store = DistroStore(paths: paths, settings: settings)
        for name in store.listed() {
            let i = vmUp ? snap.instances.first { $0.name == name } : nil
            var status = InstanceStatus(
                name: name, state: i?.state.rawValue ?? "Stopped", clients: i?.clients ?? 0,
                idleStopInSeconds: seconds(i?.stopDue), isDefault: name == store.defaultDistro)
            if let kept = i?.keptBy, !kept.isEmpty { status.keptBy = kept }
            instances.append(status)
        }
        s.instances = instances
        s.disks = store.installed().map { d in
            let u = store.diskUsage(d.name)
            return DiskUsage(name: d.name, allocatedBytes: u.allocated, sizeBytes: u.size)
        }
        return s
    }
}

extension Duration {
    /// In seconds, with its fraction: for status fields and boot phases.
    var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
