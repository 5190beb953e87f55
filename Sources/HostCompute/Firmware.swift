import Glibc

/// The BIOS the VM starts from. QEMU's default, SeaBIOS, builds a boot menu: it walks the PCI
/// bus, sets up every disk it could boot from and runs option ROMs, before it hands over to the
/// kernel we load anyway. qboot (QEMU ships it, Debian in qemu-system-data) only loads that
/// kernel. Under TCG, with uvm's devices (two virtio disks, root ports, ...): cold `uvm exec --
/// true` 3.09 s with qboot against 3.64 s with SeaBIOS (make bench, medians of 7 and 5 runs
/// back to back). Bare QEMU with one device barely differs (1.47 s against 1.51 s).
public enum Firmware {
    /// Where QEMU keeps its firmware: Debian's packages, then a build installed from source.
    public static let qemuDataDirectories = ["/usr/share/qemu", "/usr/local/share/qemu"]

    public struct Missing: Error, CustomStringConvertible {
        public let description: String
    }

    /// The `-bios` image for `[vm] firmware`; nil means QEMU's own default (SeaBIOS).
    public static func image(for setting: String, readable: (String) -> Bool = { access($0, R_OK) == 0 }) throws(Missing) -> String? {
        let qboot = qemuDataDirectories.map { $0 + "/qboot.rom" }.first(where: readable)
        switch setting {
        case "seabios":
            return nil
        case "auto":
            return qboot
        case "qboot":
            guard let qboot else {
                throw Missing(description: "firmware = qboot, but QEMU's qboot.rom is not in \(qemuDataDirectories.joined(separator: " or ")) (Debian's qemu-system-data has it); set firmware = auto or seabios")
            }
            return qboot
        default:
            guard readable(setting) else {
                throw Missing(description: "firmware = \(setting): no readable BIOS image there; set firmware = auto to use QEMU's")
            }
            return setting
        }
    }
}
