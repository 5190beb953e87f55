import Foundation
import Testing

@testable import HostCompute

@Suite struct AcceleratorTests {
    static let pvm = "the host KVM is PVM"

    func probe(device: String? = nil, hypervisor: String? = nil, libvirt: String? = nil) -> HostProbe {
        HostProbe(
            kvmDeviceProblem: { device }, kvmHypervisorProblem: { hypervisor }, libvirtKVMProblem: { libvirt })
    }

    @Test func autoTakesKVMWhenEverythingWorks() throws {
        let choice = try chooseAccelerator(.auto, probe: probe())
        #expect(choice.accelerator == .kvm)
    }

    @Test func autoFallsBackToTCGOnPVM() throws {
        let choice = try chooseAccelerator(.auto, probe: probe(hypervisor: Self.pvm))
        #expect(choice.accelerator == .tcg)
        #expect(choice.reason.contains(Self.pvm))
    }

    @Test func autoFallsBackToTCGWithoutDevKVM() throws {
        let choice = try chooseAccelerator(.auto, probe: probe(device: "/dev/kvm does not exist"))
        #expect(choice.accelerator == .tcg)
        #expect(choice.reason.contains("/dev/kvm does not exist"))
    }

    @Test func autoFallsBackToTCGWhenLibvirtHasNoKVM() throws {
        let choice = try chooseAccelerator(.auto, probe: probe(libvirt: "libvirt offers no kvm domains"))
        #expect(choice.accelerator == .tcg)
        #expect(choice.reason.contains("libvirt offers no kvm"))
    }

    @Test func forcedKVMOnPVMThrowsWithTheReason() {
        let error = #expect(throws: AcceleratorError.self) {
            try chooseAccelerator(.kvm, probe: probe(hypervisor: Self.pvm))
        }
        #expect(error?.description.contains(Self.pvm) == true)
    }

    @Test func forcedTCGNeverAsksTheHost() throws {
        let never = HostProbe(
            kvmDeviceProblem: { Issue.record("asked"); return nil },
            kvmHypervisorProblem: { Issue.record("asked"); return nil },
            libvirtKVMProblem: { Issue.record("asked"); return nil })
        #expect(try chooseAccelerator(.tcg, probe: never).accelerator == .tcg)
    }

    @Test func libvirtIsOnlyAskedWhenTheCheapChecksPass() throws {
        let probe = HostProbe(
            kvmDeviceProblem: { nil }, kvmHypervisorProblem: { Self.pvm },
            libvirtKVMProblem: { Issue.record("libvirt asked although PVM already rules KVM out"); return nil })
        #expect(try chooseAccelerator(.auto, probe: probe).accelerator == .tcg)
    }

    @Test func liveChecksReadTheirPaths() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uvm-accel-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        #expect(HostProbe.pvmProblem(sysModule: dir.path)?.contains("PVM") == true)
        #expect(HostProbe.pvmProblem(sysModule: dir.path + "/absent") == nil)
        #expect(HostProbe.kvmDeviceProblem(path: dir.path + "/absent")?.contains("does not exist") == true)
        #expect(HostProbe.kvmDeviceProblem(path: "/dev/null") == nil)
    }

    // This machine class runs PVM (host-facts.md): auto must pick TCG here, and say why.
    @Test(.enabled(if: access("/sys/module/kvm_pvm", F_OK) == 0, "host KVM is not PVM"))
    func liveProbeOnPVMHostPicksTCG() throws {
        let choice = try chooseAccelerator(.auto)
        #expect(choice.accelerator == .tcg)
        #expect(choice.reason.contains("PVM"))
    }
}

/// What `uvm doctor` and the accelerator's reason tell a user who cannot open /dev/kvm.
@Suite struct KVMAccessTests {
    func access(group: String = "kvm", mode: UInt32 = 0o20660, exists: Bool = true, db: Bool = true, process: Bool = true) -> KVMAccess {
        KVMAccess(userName: "alice", deviceGroup: group, deviceMode: mode, groupExists: exists, memberInDatabase: db, memberInProcess: process)
    }

    @Test func aUserMissingFromGroupKVMIsToldToJoinItAndLogInAgain() {
        let advice = access(db: false, process: false).advice
        #expect(advice.contains("alice is not in group kvm"))
        #expect(advice.contains("sudo usermod -aG kvm,libvirt alice"))
        #expect(advice.contains("log in again"))
    }

    @Test func aUserAddedAfterLoggingInIsToldToLogInAgain() {
        let advice = access(process: false).advice
        #expect(advice.contains("log in again"))
        #expect(!advice.contains("usermod"))
    }

    @Test func aRootOnlyDeviceIsToldHowToOpenItToTheGroup() {
        let advice = access(group: "root", mode: 0o20600).advice
        #expect(advice.contains("chgrp kvm /dev/kvm && chmod 660 /dev/kvm"))
        #expect(!advice.contains("usermod"))
        #expect(access(group: "root", mode: 0o20600, db: false, process: false).advice.contains("usermod -aG kvm,libvirt alice"))
    }

    @Test func noGroupKVMAtAll() {
        #expect(access(exists: false, db: false, process: false).advice.contains("groupadd --system kvm"))
    }

    @Test func theCurrentProcessIsDescribed() {
        let me = KVMAccess.current(device: "/dev/null")
        #expect(!me.userName.isEmpty)
        #expect(me.deviceGroup == "root")
    }
}
