import Foundation
import HostCompute
import Settings

/// `uvm doctor`: what uvm needs on this host, and how to fix what is missing.
public struct Doctor {
    public struct Check: Codable, Sendable {
        public var name: String
        public var ok: Bool
        public var detail: String
        public var fix: String?
    }

    let paths: Paths
    let settings: Settings

    public init(paths: Paths = .current(), settings: Settings = .current()) {
        self.paths = paths
        self.settings = settings
    }

    public func run() async -> [Check] {
        var checks: [Check] = []
        let fm = FileManager.default

        if let qemu = which("qemu-system-x86_64") {
            checks.append(Check(name: "qemu", ok: true, detail: qemu))
        } else {
            checks.append(Check(name: "qemu", ok: false, detail: "qemu-system-x86_64 is not installed",
                                fix: "make setup (or: apt-get install qemu-system-x86)"))
        }

        do {
            let conn = try await LibvirtConnection.open(uri: settings.libvirtURI)
            conn.close()
            checks.append(Check(name: "libvirt", ok: true, detail: "\(settings.libvirtURI) answers"))
        } catch {
            checks.append(Check(name: "libvirt", ok: false, detail: "\(error)",
                                fix: "make setup (as root without systemd: `virtlogd -d && libvirtd -d`; with systemd: `systemctl start libvirtd`)"))
        }

        if fm.fileExists(atPath: "/dev/kvm") {
            var st = stat()
            stat("/dev/kvm", &st)
            let mode = String(st.st_mode & 0o777, radix: 8)
            let usable = access("/dev/kvm", R_OK | W_OK) == 0
            checks.append(Check(name: "/dev/kvm", ok: usable, detail: "mode \(mode)" + (usable ? ", usable" : ", not usable by this user"),
                                fix: usable ? nil : "as root: chgrp kvm /dev/kvm && chmod 660 /dev/kvm; then add yourself to group kvm"))
        } else {
            checks.append(Check(name: "/dev/kvm", ok: true, detail: "absent: the VM will run under TCG (software emulation, slower)"))
        }
        do {
            let choice = try chooseAccelerator(AcceleratorPreference(rawValue: settings.accel) ?? .auto, probe: .live(uri: settings.libvirtURI))
            checks.append(Check(name: "accelerator", ok: true, detail: "\(choice.accelerator.rawValue.uppercased()): \(choice.reason)"))
        } catch {
            checks.append(Check(name: "accelerator", ok: false, detail: "\(error)", fix: "set UVM_ACCEL=auto or tcg"))
        }

        let release = (try? String(contentsOfFile: paths.kernelReleaseFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        checks.append(fm.fileExists(atPath: paths.kernel)
            ? Check(name: "kernel", ok: true, detail: "\(release ?? "?") at \(paths.kernel)")
            : Check(name: "kernel", ok: false, detail: "not built (expected \(paths.kernel))", fix: "make kernel"))
        checks.append(fm.fileExists(atPath: paths.initramfs)
            ? Check(name: "initramfs", ok: true, detail: paths.initramfs)
            : Check(name: "initramfs", ok: false, detail: "not built (expected \(paths.initramfs))", fix: "make images"))
        let distro = settings.defaultDistro
        if fm.fileExists(atPath: paths.distroDisk(distro)) {
            checks.append(Check(name: "distro", ok: true, detail: "\(distro) installed at \(paths.distroDisk(distro))"))
        } else if fm.fileExists(atPath: paths.distroTemplate(distro)) {
            checks.append(Check(name: "distro", ok: true, detail: "\(distro) built; installed on first use"))
        } else {
            checks.append(Check(name: "distro", ok: false, detail: "\(distro) is not built (expected \(paths.distroTemplate(distro)))", fix: "make images"))
        }

        var st = stat()
        if stat(paths.stateDir, &st) == 0 {
            let private_ = st.st_mode & 0o077 == 0 && st.st_uid == geteuid()
            checks.append(Check(name: "state dir", ok: private_, detail: "\(paths.stateDir) mode \(String(st.st_mode & 0o777, radix: 8))",
                                fix: private_ ? nil : "chmod 700 \(paths.stateDir)"))
        }
        return checks
    }

    func which(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }
}
