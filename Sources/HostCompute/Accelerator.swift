#if canImport(Glibc)
import Glibc
#endif

/// How QEMU runs the guest's CPU.
public enum Accelerator: String, Sendable, Codable, CaseIterable {
    /// Hardware virtualization through /dev/kvm (libvirt `type='kvm'`).
    case kvm
    /// QEMU's software emulation (libvirt `type='qemu'`): slow, but runs anywhere.
    case tcg
}

/// What the user asked for; `auto` picks KVM only when it can really boot our kernel.
public enum AcceleratorPreference: String, Sendable, Codable, CaseIterable {
    case auto, kvm, tcg
}

/// The accelerator that will be used, and why, so that uvmd can say so.
public struct AcceleratorChoice: Sendable, Equatable, CustomStringConvertible {
    public var accelerator: Accelerator
    public var reason: String

    public init(accelerator: Accelerator, reason: String) {
        self.accelerator = accelerator
        self.reason = reason
    }

    public var description: String { "\(accelerator.rawValue): \(reason)" }
}

/// KVM was asked for explicitly but cannot be used.
public struct AcceleratorError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public var description: String {
        "KVM was requested but cannot be used: \(reason). Use the accelerator setting `auto` or `tcg` instead."
    }
}

/// The host facts that decide the accelerator. Each check returns nil when KVM passes it, or the
/// reason it does not; tests substitute fakes.
public struct HostProbe: Sendable {
    /// Can this process open /dev/kvm read-write?
    public var kvmDeviceProblem: @Sendable () -> String?
    /// Can the host's KVM boot a stock (non-PVM) kernel?
    public var kvmHypervisorProblem: @Sendable () -> String?
    /// Does libvirt offer `kvm` domains for QEMU? Only asked when the checks above pass,
    /// because it costs a libvirt connection.
    public var libvirtKVMProblem: @Sendable () -> String?

    public init(
        kvmDeviceProblem: @escaping @Sendable () -> String?,
        kvmHypervisorProblem: @escaping @Sendable () -> String?,
        libvirtKVMProblem: @escaping @Sendable () -> String?
    ) {
        self.kvmDeviceProblem = kvmDeviceProblem
        self.kvmHypervisorProblem = kvmHypervisorProblem
        self.libvirtKVMProblem = libvirtKVMProblem
    }

    /// The real host, asking libvirt at `LibvirtConnection.defaultURI`.
    public static var live: HostProbe { live(uri: LibvirtConnection.defaultURI) }

    /// The real host, asking libvirt at `uri`.
    public static func live(uri: String) -> HostProbe {
        HostProbe(
            kvmDeviceProblem: { kvmDeviceProblem(path: "/dev/kvm") },
            kvmHypervisorProblem: { pvmProblem(sysModule: "/sys/module/kvm_pvm") },
            libvirtKVMProblem: { LibvirtRuntime.kvmDomainProblem(uri: uri) }
        )
    }

    static func kvmDeviceProblem(path: String) -> String? {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        if fd >= 0 {
            close(fd)
            return nil
        }
        let err = errno
        switch err {
        case ENOENT:
            return "\(path) does not exist (no KVM module loaded, or no hardware virtualization)"
        case EACCES, EPERM:
            return "\(path) cannot be opened read-write (\(String(cString: strerror(err)))): "
                + KVMAccess.current(device: path).advice
        default:
            return "\(path) cannot be opened read-write: \(String(cString: strerror(err)))"
        }
    }

    // PVM is a paravirtual nested hypervisor: /dev/kvm works, but a stock kernel hangs right
    // after the decompressor (host-facts.md), so it must count as "no KVM".
    static func pvmProblem(sysModule: String) -> String? {
        access(sysModule, F_OK) == 0
            ? "the host KVM is PVM (\(sysModule) exists), which only runs PVM-patched guest kernels"
            : nil
    }
}

/// Picks the accelerator. `auto` takes KVM only when /dev/kvm is usable, the host KVM can boot a
/// stock kernel and libvirt offers kvm domains; otherwise TCG, with the reason. A forced `kvm` that
/// cannot work throws `AcceleratorError` rather than hanging a guest.
/// May block briefly (the libvirt check opens a connection); call it once at start-up.
public func chooseAccelerator(
    _ preference: AcceleratorPreference, probe: HostProbe = .live
) throws -> AcceleratorChoice {
    func kvmProblem() -> String? {
        probe.kvmDeviceProblem() ?? probe.kvmHypervisorProblem() ?? probe.libvirtKVMProblem()
    }
    switch preference {
    case .tcg:
        return AcceleratorChoice(accelerator: .tcg, reason: "TCG was requested")
    case .kvm:
        if let problem = kvmProblem() { throw AcceleratorError(reason: problem) }
        return AcceleratorChoice(accelerator: .kvm, reason: "KVM was requested and is usable")
    case .auto:
        if let problem = kvmProblem() {
            return AcceleratorChoice(
                accelerator: .tcg,
                reason: "KVM is not usable: \(problem); using TCG (software emulation, slower)")
        }
        return AcceleratorChoice(accelerator: .kvm, reason: "KVM is usable")
    }
}
