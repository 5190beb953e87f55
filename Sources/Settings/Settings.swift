#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc

/// What the VM and its instances are made of. Defaults follow WSL where it has one; uvm.conf
/// (module Config) and then `UVM_*` environment variables override them. Every setting a user may
/// change has a row in `Settings.schema` (Schema.swift).
public struct Settings: Sendable, Equatable {
    public var memoryMiB: Int = 2048
    public var processors: Int = min(max(ProcessInfo.processInfo.activeProcessorCount, 1), 8)
    public var accel: String = "auto"          // auto | kvm | tcg
    /// What the VM starts from: auto (qboot when QEMU ships it, else SeaBIOS), seabios, qboot, or a path.
    public var firmware: String = "auto"
    public var kernelCommandLine: String = ""  // appended to ours
    public var libvirtURI: String = getuid() == 0 ? "qemu:///system" : "qemu:///session"
    public var defaultDistro: String = "busybox"
    /// uvm.conf or UVM_DEFAULT_DISTRO named the default: it wins over `uvm default`'s choice.
    public var defaultDistroIsExplicit = false
    public var bootTimeoutSeconds: Double = 180
    /// The host folder every distro sees at /mnt/host/home (WSL shows C: at /mnt/c); nil: none.
    public var homeShare: String? = ProcessInfo.processInfo.environment["HOME"] ?? homeDirectory()
    /// The guest kernel; nil: the one `make kernel` built (`Paths.kernel`).
    public var kernel: String?
    /// How long the VM lives on once no instance runs; nil: forever (WSL's vmIdleTimeout).
    public var vmIdleTimeout: Duration? = .seconds(60)
    /// How long an instance lives on once its last client has gone; nil: forever.
    public var instanceIdleTimeout: Duration? = .seconds(15)
    /// Guest ports listening on localhost appear on the host's localhost.
    public var localhostForwarding: Bool = true
    /// `uvm-host` in sessions runs host programs as this user (WSL's [interop] enabled). Off by
    /// default: the guest is untrusted, and this lets its sessions run anything as you.
    public var interopEnabled: Bool = false
    /// Swap in the VM, MiB; nil: a quarter of `memoryMiB` (WSL's default); 0: none.
    public var swapMiB: Int?
    /// The sparse file that holds it; nil: `swap.img` in uvm's data folder.
    public var swapFile: String?
    public var effectiveSwapMiB: Int { swapMiB ?? memoryMiB / 4 }
    /// WSL's autoMemoryReclaim: disabled, dropCache or gradual.
    public var autoMemoryReclaim: String = "dropCache"
    /// How long the guest must be idle (<= 0.5% CPU) before it reclaims.
    public var autoMemoryReclaimDelay: Duration = .seconds(60)

    // Development and benchmark switches: environment only, not uvm.conf settings.
    /// Free page reporting's pace in the guest (kernel patch 0002): `UVM_PAGE_REPORTING=ORDER,DELAY_MS,BUDGET_DIV`;
    /// `UVM_PAGE_REPORTING=upstream` keeps the kernel's own (order 9, 2000 ms, 1/16).
    public var pageReporting = PageReportingPace(environment: ProcessInfo.processInfo.environment["UVM_PAGE_REPORTING"] ?? "")
    /// `UVM_9P_TRANSPORT=port`: shares over the virtio-serial ports, not the shared-memory rings.
    public var ninePOverPorts: Bool = ProcessInfo.processInfo.environment["UVM_9P_TRANSPORT"] == "port"
    /// `UVM_9P_CACHE=mmap`: the guest caches no metadata of shares (cache=mmap, the old way), for
    /// benchmarks side by side; by default it caches and uvmd keeps the cache true (cache=meta).
    public var ninePMetadataCache: Bool = ProcessInfo.processInfo.environment["UVM_9P_CACHE"] != "mmap"
    /// `UVM_9P_ZERO_COPY=0`: guest RAM is not shared with uvmd, and 9P payloads are copied through the rings.
    public var ninePZeroCopy: Bool = ProcessInfo.processInfo.environment["UVM_9P_ZERO_COPY"] != "0"
    /// `UVM_BENCH_VIRTIO_9P=DIR`: QEMU's own virtio-9p export of DIR beside ours (bench_9p.py).
    public var benchVirtio9PDir: String? = ProcessInfo.processInfo.environment["UVM_BENCH_VIRTIO_9P"].flatMap { $0.isEmpty ? nil : $0 }
    /// `UVM_GUEST_WATCHDOG=SECONDS`: how long the guest agent may go without answering before the VM
    /// counts as hung and is killed (0: never). Generous: a guest under TCG that is merely busy
    /// still answers within seconds, and tests lower it.
    public var guestWatchdogSeconds: Double = ProcessInfo.processInfo.environment["UVM_GUEST_WATCHDOG"].flatMap { Double($0) }.map { max(0, $0) } ?? 120
    /// `UVM_MAX_FORWARDED_PORTS=N`: at most this many guest ports get host listeners (tests lower it).
    public var maxForwardedPorts: Int = ProcessInfo.processInfo.environment["UVM_MAX_FORWARDED_PORTS"].flatMap { Int($0) }.map { max(1, $0) } ?? 512

    public init() {}

    /// Defaults and environment only, bad values ignored; uvmd reads uvm.conf too (`Config.load`).
    public static func current(_ env: [String: String] = ProcessInfo.processInfo.environment) -> Settings {
        var s = Settings()
        var sources: [String: SettingSource] = [:]
        for key in schema { try? key.applyEnvironment(env, to: &s, sources: &sources) }
        s.defaultDistroIsExplicit = sources["general.defaultDistro"] != nil
        return s
    }
}

/// Free page reporting's pace in the guest; nil leaves the kernel's value.
public struct PageReportingPace: Sendable, Equatable {
    public var order: Int?
    public var delayMilliseconds: Int?
    public var budgetDivisor: Int?

    /// uvm's pace: a pass 250 ms after memory is freed, covering whole free lists.
    public static let uvm = PageReportingPace(order: nil, delayMilliseconds: 250, budgetDivisor: 1)
    /// The kernel's own: 2 s between passes, 1/16 of each free list per pass.
    public static let upstream = PageReportingPace(order: nil, delayMilliseconds: 2000, budgetDivisor: 16)

    public init(order: Int?, delayMilliseconds: Int?, budgetDivisor: Int?) {
        self.order = order
        self.delayMilliseconds = delayMilliseconds
        self.budgetDivisor = budgetDivisor
    }

    /// "upstream", "ORDER,DELAY_MS,BUDGET_DIV" (empty fields keep uvm's), or anything else: uvm's.
    public init(environment v: String) {
        if v == "upstream" { self = .upstream; return }
        let f = v.split(separator: ",", omittingEmptySubsequences: false).map { Int($0) }
        guard f.count == 3 else { self = .uvm; return }
        self.init(order: f[0], delayMilliseconds: f[1] ?? 250, budgetDivisor: f[2] ?? 1)
    }
}
