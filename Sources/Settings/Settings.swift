#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc

/// What the VM and its instances are made of. Defaults follow WSL where it has one; `UVM_*`
/// environment variables override them.
public struct Settings: Sendable, Equatable {
    public var memoryMiB: Int = 2048
    public var processors: Int = min(max(ProcessInfo.processInfo.activeProcessorCount, 1), 8)
    public var accel: String = "auto"          // auto | kvm | tcg
    public var kernelCommandLine: String = ""  // appended to ours
    public var libvirtURI: String = getuid() == 0 ? "qemu:///system" : "qemu:///session"
    public var defaultDistro: String = "busybox"
    public var bootTimeoutSeconds: Double = 180
    /// Forward TCP ports listening in the guest to the host's 127.0.0.1 and ::1 (WSL's default: on).
    public var localhostForwarding = true

    public init() {}

    public static func current(_ env: [String: String] = ProcessInfo.processInfo.environment) -> Settings {
        var s = Settings()
        if let v = env["UVM_MEMORY_MB"], let n = Int(v), n >= 128 { s.memoryMiB = n }
        if let v = env["UVM_CPUS"], let n = Int(v), n >= 1 { s.processors = n }
        if let v = env["UVM_ACCEL"], !v.isEmpty { s.accel = v }
        if let v = env["UVM_LIBVIRT_URI"], !v.isEmpty { s.libvirtURI = v }
        if let v = env["UVM_KERNEL_CMDLINE"] { s.kernelCommandLine = v }
        if let v = env["UVM_DEFAULT_DISTRO"], !v.isEmpty { s.defaultDistro = v }
        if let v = env["UVM_LOCALHOST_FORWARDING"] { s.localhostForwarding = !["0", "false", "no", "off"].contains(v.lowercased()) }
        return s
    }
}
