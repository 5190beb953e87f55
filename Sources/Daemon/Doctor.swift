import Distros
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
            checks.append(Check(name: "libvirt", ok: false, detail: "\(error)", fix: Self.libvirtFix(uri: settings.libvirtURI)))
        }

        if fm.fileExists(atPath: "/dev/kvm") {
            let kvm = KVMAccess.current()
            let usable = access("/dev/kvm", R_OK | W_OK) == 0
            let detail = "group \(kvm.deviceGroup), mode \(String(kvm.deviceMode & 0o777, radix: 8))"
                + (usable ? ", usable by \(kvm.userName)" : ", not usable by \(kvm.userName) (without it the VM runs under TCG, much slower)")
            checks.append(Check(name: "/dev/kvm", ok: usable, detail: detail, fix: usable ? nil : kvm.advice))
        } else {
            checks.append(Check(name: "/dev/kvm", ok: true, detail: "absent: the VM will run under TCG (software emulation, slower)"))
        }
        do {
            let choice = try chooseAccelerator(AcceleratorPreference(rawValue: settings.accel) ?? .auto, probe: .live(uri: settings.libvirtURI))
            checks.append(Check(name: "accelerator", ok: true, detail: "\(choice.accelerator.rawValue.uppercased()): \(choice.reason)"))
        } catch {
            checks.append(Check(name: "accelerator", ok: false, detail: "\(error)", fix: "set UVM_ACCEL=auto or tcg"))
        }

        // `uvm mount` only: libfuse opens /dev/fuse as the user, then the setuid fusermount3 mounts.
        let fuseDevice = access("/dev/fuse", R_OK | W_OK) == 0
        let fusermount = which("fusermount3")
        if fuseDevice, let fusermount {
            checks.append(Check(name: "fuse", ok: true, detail: "/dev/fuse usable, \(fusermount) (for `uvm mount`)"))
        } else {
            checks.append(Check(name: "fuse", ok: false,
                                detail: fusermount == nil ? "fusermount3 is not installed: `uvm mount` cannot work" : "/dev/fuse cannot be opened read-write: `uvm mount` cannot work",
                                fix: fusermount == nil ? "make setup (or: apt-get install fuse3 libfuse3-3)" : "sudo chmod 666 /dev/fuse (what udev does on most distributions)"))
        }

        let release = (try? String(contentsOfFile: paths.kernelReleaseFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        checks.append(fm.fileExists(atPath: paths.kernel)
            ? Check(name: "kernel", ok: true, detail: "\(release ?? "?") at \(paths.kernel)")
            : Check(name: "kernel", ok: false, detail: "not built (expected \(paths.kernel))", fix: "make kernel"))
        checks.append(fm.fileExists(atPath: paths.initramfs)
            ? Check(name: "initramfs", ok: true, detail: paths.initramfs)
            : Check(name: "initramfs", ok: false, detail: "not built (expected \(paths.initramfs))", fix: "make images"))
        checks.append(Self.installCheck(paths))
        let store = DistroStore(paths: paths, settings: settings)
        let distro = store.defaultDistro
        switch store.availability(distro) {
        case .installed(let disk):
            checks.append(Check(name: "distro", ok: true, detail: "\(distro) installed at \(disk)"))
        case .template:
            checks.append(Check(name: "distro", ok: true, detail: "\(distro) built; installed on first use"))
        case .importing:
            checks.append(Check(name: "distro", ok: false, detail: "\(distro) is being imported, or its import was interrupted", fix: "uvm unregister \(distro)"))
        case .absent:
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

    /// Where the kernel and images come from, and for an installed uvm (`make install`, the .deb)
    /// whether they are the ones installed with these binaries: every file in the share folder's
    /// manifest still has the sha256 it was installed with.
    static func installCheck(_ paths: Paths) -> Check {
        let version = Paths.buildVersion()
        guard let share = paths.installedShare else {
            return Check(name: "install", ok: true, detail: "uvm \(version), a development build: kernel and images from \(paths.cacheDir) (or UVM_KERNEL, UVM_IMAGES)")
        }
        let prefix = String(share.dropLast("/share/uvm".count))
        guard let manifest = try? String(contentsOfFile: "\(share)/manifest", encoding: .utf8) else {
            return Check(name: "install", ok: false, detail: "\(share) has no manifest", fix: "make install PREFIX=\(prefix) again")
        }
        var changed: [String] = []
        var checked = 0
        for line in manifest.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let rel = parts[1].drop(while: { $0 == " " || $0 == "*" })
            // The files uvm runs or boots: binaries, kernel, images.
            guard rel.hasPrefix("bin/") || rel.hasPrefix("share/uvm/kernel/") || rel.hasPrefix("share/uvm/images/") else { continue }
            checked += 1
            if sha256(of: "\(prefix)/\(rel)") != String(parts[0]) { changed.append(String(rel)) }
        }
        if !changed.isEmpty {
            return Check(name: "install", ok: false, detail: "uvm \(version) in \(prefix): \(changed.joined(separator: ", ")) changed since they were installed together",
                         fix: "make install PREFIX=\(prefix) (or reinstall the package)")
        }
        return Check(name: "install", ok: true, detail: "uvm \(version) in \(prefix): kernel \(paths.kernel), images \(paths.imagesDir); \(checked) files as installed")
    }

    /// sha256sum's answer for one file (nil when it cannot be read).
    static func sha256(of path: String) -> String? {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/sha256sum")
        p.arguments = [path]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return nil }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { return nil }
        return String(decoding: data, as: UTF8.self).split(separator: " ").first.map(String.init)
    }

    /// How to get the daemon behind `uri` going. A per-user daemon (qemu:///session) is started
    /// by libvirt itself on first use, no systemd needed; a system one is started by root.
    static func libvirtFix(uri: String) -> String {
        if isSessionURI(uri) {
            return "libvirt starts its per-user daemon by itself: check that libvirt-daemon-system and qemu-system-x86 are installed "
                + "(`make setup` says how) and see ~/.cache/libvirt/libvirtd.log"
        }
        let systemd = (try? String(contentsOfFile: "/proc/1/comm", encoding: .utf8))?.hasPrefix("systemd") == true
        return systemd ? "as root: `systemctl start libvirtd`" : "as root (no systemd here): `virtlogd -d && libvirtd -d` (or `make setup`)"
    }

    func which(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }
}
