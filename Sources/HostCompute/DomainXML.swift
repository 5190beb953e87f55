#if canImport(Glibc)
import Glibc
#endif

/// Everything uvmd decides about the utility VM; `domainXML(for:)` turns it into libvirt XML.
public struct VMSpec: Sendable, Equatable {
    /// A virtio-blk disk. The guest finds it by `serial` (/sys/block/vdX/serial), not by its
    /// vdX name, which depends on PCI probe order.
    public struct Disk: Sendable, Equatable {
        public var path: String
        /// At most 20 bytes: virtio-blk truncates longer serials.
        public var serial: String
        public var readOnly: Bool
        /// A disk the VM keeps until it stops (swap) sits on the root bus, without a root port of
        /// its own; the others can be hot-unplugged (a distro removed while the VM runs).
        public var fixed: Bool

        public init(path: String, serial: String, readOnly: Bool = false, fixed: Bool = false) {
            self.path = path
            self.serial = serial
            self.readOnly = readOnly
            self.fixed = fixed
        }
    }

    /// A virtio-serial port. QEMU binds and listens on `socketPath`; the guest opens the port
    /// named `name` (found through /sys/class/virtio-ports/*/name).
    public struct Channel: Sendable, Equatable {
        public var name: String
        public var socketPath: String

        public init(name: String, socketPath: String) {
            self.name = name
            self.socketPath = socketPath
        }
    }

    /// A host folder served by QEMU's own virtio-9p (`mount -t 9p -o trans=virtio TAG`). uvm
    /// shares go through its own server; this is here so benchmarks can compare the two.
    public struct Filesystem: Sendable, Equatable {
        public var source: String
        public var tag: String
        public init(source: String, tag: String) {
            self.source = source
            self.tag = tag
        }
    }

    /// An ivshmem-doorbell device whose shared memory and interrupts come from the ivshmem server
    /// listening on `serverPath` (uvmd's 9P rings; the guest kernel's `uvmshm` transport).
    public struct SharedMemory: Sendable, Equatable {
        public var name: String
        public var serverPath: String
        public var vectors: Int
        public init(name: String, serverPath: String, vectors: Int) {
            self.name = name
            self.serverPath = serverPath
            self.vectors = vectors
        }
    }

    /// The uid/gid QEMU runs as.
    public enum ProcessIdentity: Sendable, Equatable {
        /// Whatever the libvirt daemon is configured for (libvirt-qemu under qemu:///system), with
        /// libvirt chown-ing the files it hands to QEMU.
        case libvirtDefault
        /// A static DAC label `+uid:+gid` with relabel='no': QEMU runs as this user, and libvirt
        /// leaves the ownership of our files alone.
        case user(uid: UInt32, gid: UInt32)

        /// The calling process's identity.
        public static var caller: ProcessIdentity { .user(uid: getuid(), gid: getgid()) }

        /// What a domain created through `uri` needs. A per-user daemon (`qemu:///session`)
        /// already runs QEMU as its user and has no DAC security driver: it refuses any DAC
        /// `<seclabel>` ("Security driver model 'dac' is not available"). A system daemon runs
        /// QEMU as libvirt-qemu unless told to run it as the caller.
        public static func forConnection(uri: String) -> ProcessIdentity {
            isSessionURI(uri) ? .libvirtDefault : .caller
        }
    }

    /// The libvirt domain name, e.g. "uvm-<uid>".
    public var name: String
    public var accelerator: Accelerator
    public var memoryMiB: Int
    public var vcpus: Int
    /// Direct kernel boot. nil boots firmware only, which tests use.
    public var kernel: String?
    /// A BIOS image in place of QEMU's SeaBIOS (`-bios`): qboot, which only loads the kernel.
    public var firmware: String? = nil
    public var initrd: String?
    public var cmdline: String?
    public var disks: [Disk]
    public var channels: [Channel]
    /// Where the guest's first serial port (ttyS0) is written; nil means no serial port at all.
    public var consoleLog: String?
    /// A virtio NIC on QEMU's user-mode (slirp) network.
    public var userNetwork: Bool
    /// `.caller` under a system daemon: libvirt would otherwise run QEMU as libvirt-qemu, which
    /// cannot read the kernel, initrd and disks under /root, and would chown them. Measured here:
    /// `<seclabel type='none' model='dac'/>` is NOT enough (QEMU still ran as libvirt-qemu, it only
    /// turns relabelling off); the static label `+0:+0` relabel='no' ran it as root. Running QEMU
    /// as the caller gives the VM exactly the caller's rights, which is what qemu:///session gives
    /// an ordinary user by itself; there it must be `.libvirtDefault` (see `forConnection`).
    public var processIdentity: ProcessIdentity
    public var filesystems: [Filesystem] = []
    public var sharedMemory: [SharedMemory] = []
    /// Guest RAM in a shared memfd (libvirt `<memoryBacking>`), which uvmd maps to read and write
    /// 9P payloads straight in the guest's pages (zero copy; Plan9's GuestMemory).
    public var sharedGuestMemory = false
    /// Empty PCIe root ports for disks hot-plugged later (`diskXML`): one per distro that may be
    /// added while the VM runs.
    public var hotplugSlots: Int = 0

    public init(
        name: String,
        accelerator: Accelerator,
        memoryMiB: Int = 1024,
        vcpus: Int = 2,
        kernel: String? = nil,
        initrd: String? = nil,
        cmdline: String? = nil,
        disks: [Disk] = [],
        channels: [Channel] = [],
        consoleLog: String? = nil,
        userNetwork: Bool = true,
        processIdentity: ProcessIdentity = .forConnection(uri: LibvirtConnection.defaultURI)
    ) {
        self.name = name
        self.accelerator = accelerator
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.disks = disks
        self.channels = channels
        self.consoleLog = consoleLog
        self.userNetwork = userNetwork
        self.processIdentity = processIdentity
    }
}

/// libvirt domain XML for a transient utility VM. Under TCG every emulated device costs boot time,
/// so only what the guest uses is there: no graphics, video, USB, NIC option ROM, vmport or SMM.
public func domainXML(for spec: VMSpec) -> String {
    var x = XMLLines()
    x.open("domain", ["type": spec.accelerator == .kvm ? "kvm" : "qemu"])
    x.leaf("name", spec.name)
    x.leaf("memory", String(spec.memoryMiB), ["unit": "MiB"])
    x.leaf("vcpu", String(spec.vcpus), ["placement": "static"])
    if spec.sharedGuestMemory {
        x.open("memoryBacking")
        x.empty("source", ["type": "memfd"])
        x.empty("access", ["mode": "shared"])
        x.close("memoryBacking")
    }

    x.open("os")
    x.leaf("type", "hvm", ["arch": "x86_64", "machine": "q35"])
    if let firmware = spec.firmware { x.leaf("loader", firmware, ["readonly": "yes", "type": "rom"]) }
    if let kernel = spec.kernel { x.leaf("kernel", kernel) }
    if let initrd = spec.initrd { x.leaf("initrd", initrd) }
    if let cmdline = spec.cmdline { x.leaf("cmdline", cmdline) }
    x.close("os")

    // ACPI for the power-button shutdown; vmport and SMM are legacy emulation nobody here uses.
    x.open("features")
    x.empty("acpi")
    x.empty("apic")
    x.empty("vmport", ["state": "off"])
    x.empty("smm", ["state": "off"])
    x.close("features")

    // TCG keeps QEMU's default CPU model: host-passthrough is meaningless without KVM, and
    // `-cpu host`/`-cpu max` abort QEMU on the PVM hosts (host-facts.md).
    if spec.accelerator == .kvm {
        x.empty("cpu", ["mode": "host-passthrough", "check": "none", "migratable": "off"])
    }
    x.empty("clock", ["offset": "utc"])

    // A utility VM never reboots in place: any exit ends the domain and uvmd sees `stopped`.
    x.leaf("on_poweroff", "destroy")
    x.leaf("on_reboot", "destroy")
    x.leaf("on_crash", "destroy")

    x.open("devices")
    // Devices the VM keeps for its whole life are integrated endpoints on the root bus (slots
    // 0x10 on): each PCIe root port costs SeaBIOS and the guest kernel probing time under TCG, and
    // with one per device the 13 of them made a cold start ~0.5 s longer (3.86 s against 3.39 s).
    // Root ports remain only where hot-plug needs them.
    var slot = 0x10
    func rootBusAddress() -> KeyValuePairs<String, String> {
        defer { slot += 1 }
        return ["type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x" + String(slot, radix: 16), "function": "0x0"]
    }
    for (index, disk) in spec.disks.enumerated() { diskXML(&x, disk, index: index, address: disk.fixed ? rootBusAddress() : nil) }
    // Empty PCIe slots, so that distro disks can be hot-plugged while the VM runs (q35 has no
    // hot-plug on its root bus; libvirt only adds the root ports boot-time devices need).
    if spec.hotplugSlots > 0 {
        // Named first, so that libvirt numbers the root ports after it. libvirt puts the boot-time
        // devices on the root ports it finds before adding its own, so there is one for each of
        // those too, and `hotplugSlots` stay empty.
        x.empty("controller", ["type": "pci", "index": "0", "model": "pcie-root"])
        for _ in 0..<(spec.hotplugSlots + pcieEndpoints(spec)) {
            x.empty("controller", ["type": "pci", "model": "pcie-root-port"])
        }
    }
    // q35 otherwise gets a qemu-xhci controller.
    x.empty("controller", ["type": "usb", "model": "none"])
    if !spec.channels.isEmpty {
        x.open("controller", ["type": "virtio-serial", "index": "0"])
        x.empty("address", rootBusAddress())
        x.close("controller")
    }
    if let log = spec.consoleLog {
        x.open("serial", ["type": "file"])
        x.empty("source", ["path": log])
        x.empty("target", ["port": "0"])
        x.close("serial")
    }
    for channel in spec.channels {
        x.open("channel", ["type": "unix"])
        x.empty("source", ["mode": "bind", "path": channel.socketPath])
        x.empty("target", ["type": "virtio", "name": channel.name])
        x.close("channel")
    }
    for fs in spec.filesystems {
        x.open("filesystem", ["type": "mount", "accessmode": "passthrough"])
        x.empty("source", ["dir": fs.source])
        x.empty("target", ["dir": fs.tag])
        x.close("filesystem")
    }
    for shm in spec.sharedMemory {
        x.open("shmem", ["name": shm.name])
        x.empty("model", ["type": "ivshmem-doorbell"])
        x.empty("server", ["path": shm.serverPath])
        x.empty("msi", ["vectors": String(shm.vectors), "ioeventfd": "on"])
        // A conventional PCI device: on the root bus it needs no pcie-to-pci-bridge either.
        x.empty("address", rootBusAddress())
        x.close("shmem")
    }
    if spec.userNetwork {
        x.open("interface", ["type": "user"])
        x.empty("model", ["type": "virtio"])
        // The iPXE ROM only matters for network boot; we boot the kernel directly.
        x.empty("rom", ["enabled": "no"])
        x.empty("address", rootBusAddress())
        x.close("interface")
    }
    x.open("rng", ["model": "virtio"])
    x.leaf("backend", "/dev/urandom", ["model": "random"])
    x.empty("address", rootBusAddress())
    x.close("rng")
    // Free page reporting hands memory the guest frees back to the host, as WSL2 does.
    x.open("memballoon", ["model": "virtio", "freePageReporting": "on"])
    x.empty("address", rootBusAddress())
    x.close("memballoon")
    x.close("devices")

    switch spec.processIdentity {
    case .libvirtDefault:
        break
    case .user(let uid, let gid):
        x.open("seclabel", ["type": "static", "model": "dac", "relabel": "no"])
        x.leaf("label", "+\(uid):+\(gid)")
        x.close("seclabel")
    }
    x.close("domain")
    return x.text
}

/// The devices `domainXML` leaves to libvirt to place, each on a root port of its own: the disks
/// that can be hot-unplugged and QEMU's own 9P exports (benchmarks).
func pcieEndpoints(_ spec: VMSpec) -> Int {
    spec.disks.count { !$0.fixed } + spec.filesystems.count
}

/// One disk element: at boot (in the domain) and for hot-plug (`VMDomain.attachDevice`), where
/// `index` must not be used by another disk of the running VM.
public func diskXML(_ disk: VMSpec.Disk, index: Int) -> String {
    var x = XMLLines()
    diskXML(&x, disk, index: index, address: nil)
    return x.text
}

private func diskXML(_ x: inout XMLLines, _ disk: VMSpec.Disk, index: Int, address: KeyValuePairs<String, String>?) {
    x.open("disk", ["type": "file", "device": "disk"])
    // discard=unmap: blocks the guest frees (fstrim, `discard` mounts) go back to the host's sparse file.
    x.empty("driver", ["name": "qemu", "type": "raw", "discard": "unmap"])
    x.empty("source", ["file": disk.path])
    x.empty("target", ["dev": virtioDiskName(index), "bus": "virtio"])
    x.leaf("serial", disk.serial)
    if disk.readOnly { x.empty("readonly") }
    if let address { x.empty("address", address) }
    x.close("disk")
}

/// Whether `uri` names a per-user libvirt daemon (`qemu:///session`, `qemu+unix:///session?...`).
public func isSessionURI(_ uri: String) -> Bool {
    guard let scheme = uri.range(of: "://") else { return false }
    var path = uri[scheme.upperBound...]
    // The host part (empty for local URIs) ends at the first "/".
    if let slash = path.firstIndex(of: "/") { path = path[slash...] } else { return false }
    if let query = path.firstIndex(of: "?") { path = path[..<query] }
    return path == "/session"
}

/// vda..vdz, vdaa.. as libvirt counts (virIndexToDiskName).
public func virtioDiskName(_ index: Int) -> String {
    var suffix = ""
    var i = index
    repeat {
        suffix = String(UnicodeScalar(UInt8(ascii: "a") + UInt8(i % 26))) + suffix
        i = i / 26 - 1
    } while i >= 0
    return "vd" + suffix
}

/// Escapes text for XML element content and single- or double-quoted attributes. Characters XML 1.0
/// cannot carry at all (most C0 controls) become U+FFFD, so the document always parses.
func xmlEscape(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.utf8.count)
    for scalar in s.unicodeScalars {
        switch scalar {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "'": out += "&apos;"
        case "\"": out += "&quot;"
        case "\t", "\n", "\r": out += "&#\(scalar.value);"
        case _ where scalar.value < 0x20 || scalar.value == 0xFFFE || scalar.value == 0xFFFF:
            out += "\u{FFFD}"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

/// A minimal indented XML writer; attribute order is the order given (KeyValuePairs).
private struct XMLLines {
    var text = ""
    var depth = 0

    private func attributes(_ attrs: KeyValuePairs<String, String>) -> String {
        attrs.map { " \($0.key)='\(xmlEscape($0.value))'" }.joined()
    }
    private var indent: String { String(repeating: "  ", count: depth) }

    mutating func open(_ tag: String, _ attrs: KeyValuePairs<String, String> = [:]) {
        text += "\(indent)<\(tag)\(attributes(attrs))>\n"
        depth += 1
    }
    mutating func close(_ tag: String) {
        depth -= 1
        text += "\(indent)</\(tag)>\n"
    }
    mutating func empty(_ tag: String, _ attrs: KeyValuePairs<String, String> = [:]) {
        text += "\(indent)<\(tag)\(attributes(attrs))/>\n"
    }
    mutating func leaf(_ tag: String, _ value: String, _ attrs: KeyValuePairs<String, String> = [:]) {
        text += "\(indent)<\(tag)\(attributes(attrs))>\(xmlEscape(value))</\(tag)>\n"
    }
}
