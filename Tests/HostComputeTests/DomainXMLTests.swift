import Foundation
import Testing

#if canImport(FoundationXML)
import FoundationXML
#endif

@testable import HostCompute

@Suite struct DomainXMLTests {
    static let full = VMSpec(
        name: "uvm-1000",
        accelerator: .tcg,
        memoryMiB: 2048,
        vcpus: 2,
        kernel: "/root/.cache/uvm/bzImage",
        initrd: "/root/.cache/uvm/initramfs.cpio.gz",
        cmdline: "console=ttyS0 quiet uvm.ports=uvm.control",
        disks: [
            .init(path: "/var/lib/uvm/debian.img", serial: "uvm-debian"),
            .init(path: "/var/lib/uvm/tools.img", serial: "uvm-tools", readOnly: true),
        ],
        channels: [
            .init(name: "uvm.control", socketPath: "/run/uvm/control.sock"),
            .init(name: "uvm.9p", socketPath: "/run/uvm/9p.sock"),
        ],
        consoleLog: "/run/uvm/console.log",
        userNetwork: true,
        processIdentity: .user(uid: 0, gid: 0))

    func parse(_ spec: VMSpec) throws -> XMLElement {
        let doc = try XMLDocument(xmlString: domainXML(for: spec), options: [])
        return try #require(doc.rootElement())
    }

    func nodes(_ root: XMLElement, _ xpath: String) throws -> [XMLNode] {
        try root.nodes(forXPath: xpath)
    }

    func value(_ root: XMLElement, _ xpath: String) throws -> String? {
        try nodes(root, xpath).first?.stringValue
    }

    @Test func fullSpecHasTheExpectedShape() throws {
        let d = try parse(Self.full)
        #expect(d.name == "domain")
        #expect(try value(d, "@type") == "qemu")
        #expect(try value(d, "name") == "uvm-1000")
        #expect(try value(d, "memory") == "2048")
        #expect(try value(d, "memory/@unit") == "MiB")
        #expect(try value(d, "vcpu") == "2")
        #expect(try value(d, "os/type") == "hvm")
        #expect(try value(d, "os/type/@machine") == "q35")
        #expect(try value(d, "os/kernel") == "/root/.cache/uvm/bzImage")
        #expect(try value(d, "os/initrd") == "/root/.cache/uvm/initramfs.cpio.gz")
        #expect(try value(d, "os/cmdline") == "console=ttyS0 quiet uvm.ports=uvm.control")
        #expect(try value(d, "on_poweroff") == "destroy")
        #expect(try value(d, "on_reboot") == "destroy")
        #expect(try value(d, "on_crash") == "destroy")
        // TCG: no host-passthrough (QEMU aborts with -cpu host/max on PVM hosts).
        #expect(try nodes(d, "cpu").isEmpty)

        let disks = try nodes(d, "devices/disk")
        #expect(disks.count == 2)
        #expect(try value(d, "devices/disk[1]/source/@file") == "/var/lib/uvm/debian.img")
        #expect(try value(d, "devices/disk[1]/target/@dev") == "vda")
        #expect(try value(d, "devices/disk[1]/target/@bus") == "virtio")
        #expect(try value(d, "devices/disk[1]/serial") == "uvm-debian")
        #expect(try nodes(d, "devices/disk[1]/readonly").isEmpty)
        #expect(try value(d, "devices/disk[2]/target/@dev") == "vdb")
        #expect(try value(d, "devices/disk[2]/serial") == "uvm-tools")
        #expect(try nodes(d, "devices/disk[2]/readonly").count == 1)

        #expect(try nodes(d, "devices/channel").count == 2)
        #expect(try value(d, "devices/channel[1]/@type") == "unix")
        #expect(try value(d, "devices/channel[1]/source/@mode") == "bind")
        #expect(try value(d, "devices/channel[1]/source/@path") == "/run/uvm/control.sock")
        #expect(try value(d, "devices/channel[1]/target/@type") == "virtio")
        #expect(try value(d, "devices/channel[1]/target/@name") == "uvm.control")
        #expect(try value(d, "devices/channel[2]/target/@name") == "uvm.9p")

        #expect(try value(d, "devices/interface/@type") == "user")
        #expect(try value(d, "devices/interface/model/@type") == "virtio")
        #expect(try value(d, "devices/rng/@model") == "virtio")
        #expect(try value(d, "devices/rng/backend/@model") == "random")
        #expect(try value(d, "devices/rng/backend") == "/dev/urandom")
        #expect(try value(d, "devices/memballoon/@model") == "virtio")
        #expect(try value(d, "devices/memballoon/@freePageReporting") == "on")
        #expect(try value(d, "devices/serial/@type") == "file")
        #expect(try value(d, "devices/serial/source/@path") == "/run/uvm/console.log")
        #expect(try value(d, "devices/controller[@type='usb']/@model") == "none")
        // Nothing that costs boot time under TCG and that nobody looks at.
        #expect(try nodes(d, "devices/graphics").isEmpty)
        #expect(try nodes(d, "devices/video").isEmpty)
        #expect(try nodes(d, "devices/sound").isEmpty)

        #expect(try value(d, "seclabel/@type") == "static")
        #expect(try value(d, "seclabel/@model") == "dac")
        #expect(try value(d, "seclabel/@relabel") == "no")
        #expect(try value(d, "seclabel/label") == "+0:+0")
    }

    /// Devices the VM keeps for life (swap, virtio-serial, NIC, rng, balloon, ivshmem) sit on the
    /// root bus at distinct slots; root ports exist only for the hot-unpluggable disks and the
    /// empty hot-plug slots (each root port costs the guest's boot time).
    @Test func fixedDevicesAreOnTheRootBusAndRootPortsOnlyWhereHotPlugNeedsThem() throws {
        var spec = Self.full
        spec.disks.append(.init(path: "/var/lib/uvm/swap.img", serial: "uvm.swap", fixed: true))
        spec.sharedMemory = [.init(name: "uvm-9p", serverPath: "/run/uvm/9p-shm.sock", vectors: 8)]
        spec.hotplugSlots = 5
        let d = try parse(spec)
        let onRootBus = try nodes(d, "devices/*/address[@bus='0x00']")
        let owners = onRootBus.compactMap { $0.parent?.name }.sorted()
        #expect(owners == ["controller", "disk", "interface", "memballoon", "rng", "shmem"])
        #expect(try value(d, "devices/controller[@type='virtio-serial']/address/@bus") == "0x00")
        #expect(try value(d, "devices/disk[serial='uvm.swap']/address/@bus") == "0x00")
        #expect(try nodes(d, "devices/disk[serial='uvm-debian']/address").isEmpty)
        let slots = try nodes(d, "devices/*/address[@bus='0x00']/@slot").compactMap(\.stringValue)
        #expect(Set(slots).count == slots.count && slots.allSatisfy { $0.hasPrefix("0x1") }, "\(slots)")
        // Two distro disks + five empty slots.
        #expect(try nodes(d, "devices/controller[@model='pcie-root-port']").count == 7)
    }

    @Test func kvmUsesHostPassthrough() throws {
        var spec = Self.full
        spec.accelerator = .kvm
        let d = try parse(spec)
        #expect(try value(d, "@type") == "kvm")
        #expect(try value(d, "cpu/@mode") == "host-passthrough")
    }

    @Test func firmwareIsALoaderROM() throws {
        var spec = Self.full
        spec.firmware = "/usr/share/qemu/qboot.rom"
        let d = try parse(spec)
        #expect(try value(d, "os/loader") == "/usr/share/qemu/qboot.rom")
        #expect(try value(d, "os/loader/@type") == "rom")
        #expect(try value(d, "os/loader/@readonly") == "yes")
    }

    @Test func firmwareSettingPicksQbootOnlyWhereItIs() throws {
        let qboot = Firmware.qemuDataDirectories[0] + "/qboot.rom"
        #expect(try Firmware.image(for: "auto", readable: { $0 == qboot }) == qboot)
        #expect(try Firmware.image(for: "auto", readable: { _ in false }) == nil)  // SeaBIOS
        #expect(try Firmware.image(for: "seabios", readable: { _ in true }) == nil)
        #expect(try Firmware.image(for: "qboot", readable: { $0 == qboot }) == qboot)
        #expect(try Firmware.image(for: "/opt/bios.bin", readable: { $0 == "/opt/bios.bin" }) == "/opt/bios.bin")
        #expect(throws: Firmware.Missing.self) { try Firmware.image(for: "qboot", readable: { _ in false }) }
        #expect(throws: Firmware.Missing.self) { try Firmware.image(for: "/opt/none.bin", readable: { _ in false }) }
    }

    @Test func minimalSpecOmitsWhatIsNotAsked() throws {
        let d = try parse(VMSpec(name: "bare", accelerator: .tcg, userNetwork: false, processIdentity: .libvirtDefault))
        #expect(try nodes(d, "os/loader").isEmpty)
        #expect(try nodes(d, "os/kernel").isEmpty)
        #expect(try nodes(d, "os/initrd").isEmpty)
        #expect(try nodes(d, "os/cmdline").isEmpty)
        #expect(try nodes(d, "devices/disk").isEmpty)
        #expect(try nodes(d, "devices/serial").isEmpty)
        #expect(try nodes(d, "devices/interface").isEmpty)
        #expect(try nodes(d, "seclabel").isEmpty)
    }

    @Test func sharedGuestMemoryIsASharedMemfd() throws {
        var spec = Self.full
        #expect(try nodes(try parse(spec), "memoryBacking").isEmpty)
        spec.sharedGuestMemory = true
        let d = try parse(spec)
        #expect(try value(d, "memoryBacking/source/@type") == "memfd")
        #expect(try value(d, "memoryBacking/access/@mode") == "shared")
    }

    @Test func sharedMemoryIsAnIvshmemDoorbellWithOneVectorPerChannel() throws {
        var spec = Self.full
        spec.sharedMemory = [.init(name: "uvm-9p", serverPath: "/run/uvm/9p-shm.sock", vectors: 8)]
        let d = try parse(spec)
        #expect(try value(d, "devices/shmem/@name") == "uvm-9p")
        #expect(try value(d, "devices/shmem/model/@type") == "ivshmem-doorbell")
        #expect(try value(d, "devices/shmem/server/@path") == "/run/uvm/9p-shm.sock")
        #expect(try value(d, "devices/shmem/msi/@vectors") == "8")
        #expect(try nodes(try parse(Self.full), "devices/shmem").isEmpty)
    }

    /// A per-user libvirtd has no DAC driver and refuses the domain if it carries a DAC label
    /// ("Security driver model 'dac' is not available"): ordinary users could not boot at all.
    @Test func sessionDomainsCarryNoSecurityLabel() throws {
        var spec = Self.full
        spec.processIdentity = .forConnection(uri: "qemu:///session")
        #expect(try nodes(try parse(spec), "seclabel").isEmpty)
        spec.processIdentity = .forConnection(uri: "qemu:///system")
        #expect(try value(try parse(spec), "seclabel/label") == "+\(getuid()):+\(getgid())")
    }

    @Test func sessionURIsAreRecognized() {
        for uri in ["qemu:///session", "qemu+unix:///session", "qemu+unix:///session?socket=/run/user/1000/libvirt/libvirt-sock"] {
            #expect(isSessionURI(uri), "\(uri)")
        }
        for uri in ["qemu:///system", "qemu+ssh://host/system", "qemu+ssh://host/session-not", "test:///default", "session", ""] {
            #expect(!isSessionURI(uri), "\(uri)")
        }
    }

    @Test func callerIdentityIsTheProcessIDs() {
        #expect(VMSpec.ProcessIdentity.caller == .user(uid: getuid(), gid: getgid()))
    }

    @Test func everyStringIsEscaped() throws {
        let nasty = #"a<b>&c'd"e"#
        let spec = VMSpec(
            name: "uvm-" + nasty, accelerator: .tcg, kernel: "/k/" + nasty, cmdline: "x=\(nasty)\nnext",
            disks: [.init(path: "/d/" + nasty, serial: "s'\"<")],
            channels: [.init(name: "ch" + nasty, socketPath: "/s/" + nasty)],
            consoleLog: "/l/" + nasty)
        let xml = domainXML(for: spec)
        #expect(!xml.contains(nasty))
        let d = try parse(spec)
        #expect(try value(d, "name") == "uvm-" + nasty)
        #expect(try value(d, "os/kernel") == "/k/" + nasty)
        #expect(try value(d, "os/cmdline") == "x=\(nasty)\nnext")
        #expect(try value(d, "devices/disk/source/@file") == "/d/" + nasty)
        #expect(try value(d, "devices/disk/serial") == "s'\"<")
        #expect(try value(d, "devices/channel/target/@name") == "ch" + nasty)
        #expect(try value(d, "devices/channel/source/@path") == "/s/" + nasty)
        #expect(try value(d, "devices/serial/source/@path") == "/l/" + nasty)
    }

    @Test func controlCharactersStillParse() throws {
        let d = try parse(VMSpec(name: "a\u{1}b\u{0}c", accelerator: .tcg))
        #expect(try value(d, "name") == "a\u{FFFD}b\u{FFFD}c")
    }

    @Test func diskNamesCountLikeLibvirt() {
        #expect(virtioDiskName(0) == "vda")
        #expect(virtioDiskName(25) == "vdz")
        #expect(virtioDiskName(26) == "vdaa")
        #expect(virtioDiskName(27) == "vdab")
        #expect(virtioDiskName(701) == "vdzz")
        #expect(virtioDiskName(702) == "vdaaa")
    }
}
