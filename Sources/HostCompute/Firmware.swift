import Glibc

/// The BIOS the VM starts from. QEMU's default, SeaBIOS, builds a boot menu: it walks the PCI
/// bus, sets up every disk it could boot from and runs option ROMs, before it hands over to the
/// kernel we load anyway. qboot (QEMU ships it, Debian in qemu-system-data) only loads that
/// kernel. Under TCG this is measurable: bare QEMU booting our kernel and initramfs to power-off
/// took 1.27–1.79 s with qboot against 1.79–2.81 s with SeaBIOS, alternating on one machine.
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
