#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc

/// Where uvm keeps things. Built artifacts (kernel, images) are shared by every uvmd of the user;
/// state (socket, logs, distro disks) lives under `UVM_HOME` when set, so tests and several
/// independent uvm setups can run side by side.
public struct Paths: Sendable, Equatable {
    public var home: String?
    public var stateDir: String
    public var dataDir: String
    public var cacheDir: String
    public var configFile: String
    /// What UVM_SOCKET, UVM_KERNEL, UVM_IMAGES and UVM_INITRAMFS said when `current` read them.
    public var socketOverride: String?
    public var kernelOverride: String?
    public var imagesOverride: String?
    public var initramfsOverride: String?
    /// An installed uvm's share folder (`PREFIX/share/uvm`, next to `PREFIX/bin/uvm`): its kernel
    /// and images come before the build cache's. `UVM_SHARE` names another one.
    public var installedShare: String?

    /// Read from `env` once: a Paths never changes under its user's feet.
    public static func current(_ env: [String: String] = ProcessInfo.processInfo.environment) -> Paths {
        func value(_ name: String) -> String? { env[name].flatMap { $0.isEmpty ? nil : $0 } }
        let userHome = env["HOME"] ?? homeDirectory()
        let cache = (value("XDG_CACHE_HOME") ?? "\(userHome)/.cache") + "/uvm"
        let config = env["UVM_CONFIG"] ?? ((value("XDG_CONFIG_HOME") ?? "\(userHome)/.config") + "/uvm/uvm.conf")
        var paths: Paths
        if let home = value("UVM_HOME") {
            paths = Paths(home: home, stateDir: "\(home)/state", dataDir: "\(home)/data", cacheDir: cache, configFile: config)
        } else {
            let state = (value("XDG_STATE_HOME") ?? "\(userHome)/.local/state") + "/uvm"
            let data = (value("XDG_DATA_HOME") ?? "\(userHome)/.local/share") + "/uvm"
            paths = Paths(home: nil, stateDir: state, dataDir: data, cacheDir: cache, configFile: config)
        }
        paths.socketOverride = env["UVM_SOCKET"]
        paths.kernelOverride = env["UVM_KERNEL"]
        paths.imagesOverride = value("UVM_IMAGES")
        paths.initramfsOverride = env["UVM_INITRAMFS"]
        paths.installedShare = value("UVM_SHARE") ?? installedShareFolder()
        return paths
    }

    /// `../share/uvm` from the running executable, when it holds a kernel (`make install` put it there).
    public static func installedShareFolder() -> String? {
        guard let (_, prefix) = executableFolders() else { return nil }
        let share = prefix + "/share/uvm"
        return access(share + "/kernel/bzImage", R_OK) == 0 ? share : nil
    }

    /// The running executable's folder (`PREFIX/bin`) and the one above it (`PREFIX`).
    static func executableFolders() -> (bin: String, prefix: String)? {
        guard let exe = executablePath(), let slash = exe.lastIndex(of: "/") else { return nil }
        let bin = String(exe[..<slash])
        return (bin, bin.lastIndex(of: "/").map { String(bin[..<$0]) } ?? "")
    }

    /// /proc/self/exe, resolved.
    public static func executablePath() -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// What this build calls itself: `VERSION (git COMMIT)`, written by `make build` next to the
    /// binaries (`uvm-version`) and by `make install` into the share folder (`version`).
    public static func buildVersion() -> String {
        guard let (bin, prefix) = executableFolders() else { return "unknown" }
        for f in ["\(bin)/uvm-version", "\(prefix)/share/uvm/version"] {
            if let text = try? String(contentsOfFile: f, encoding: .utf8) {
                let line = text.split(separator: "\n").first.map(String.init) ?? ""
                if !line.isEmpty { return line }
            }
        }
        return "unknown (built without make: no uvm-version in \(bin))"
    }

    /// The daemon's socket; `UVM_SOCKET` overrides.
    public var socket: String { socketOverride ?? "\(stateDir)/uvmd.sock" }
    public var daemonLock: String { "\(stateDir)/uvmd.lock" }
    /// uvmd's exit status when another uvmd holds `daemonLock` (EX_TEMPFAIL): a `uvm` that
    /// launched it lost a race with another start and waits for the winner to listen.
    public static let daemonAlreadyRunningStatus: Int32 = 75
    public var daemonLog: String { "\(stateDir)/uvmd.log" }
    public var consoleLog: String { "\(stateDir)/console.log" }
    /// The host end of the guest agent's control port (QEMU binds it).
    public var controlSocket: String { "\(stateDir)/run/control.sock" }
    public var runDir: String { "\(stateDir)/run" }
    /// The host end of 9P port `slot` (one port per mounted share).
    public func ninePSocket(_ slot: Int) -> String { "\(stateDir)/run/9p-\(slot).sock" }
    /// Where uvmd's ivshmem server hands QEMU the 9P rings' shared memory.
    public var ninePSharedMemorySocket: String { "\(stateDir)/run/9p-shm.sock" }
    /// `uvm share add` shares, kept across restarts.
    public var sharesFile: String { "\(dataDir)/shares.json" }

    public var kernel: String { kernelOverride ?? installedShare.map { "\($0)/kernel/bzImage" } ?? "\(cacheDir)/kernel/current/bzImage" }
    /// What QEMU boots for `kernel`: a bzImage with the uncompressed `vmlinux` that kernel.sh leaves
    /// beside it boots as that vmlinux, through its PVH entry point, so that the guest does not
    /// decompress itself (emulated code under TCG: bare QEMU boots about 0.1 s sooner, 1.51 s
    /// against 1.60 s, median of 7). Anything else, or a bzImage alone, boots as given.
    public static func bootImage(for kernel: String) -> String {
        guard let slash = kernel.lastIndex(of: "/"), kernel[kernel.index(after: slash)...] == "bzImage" else { return kernel }
        let vmlinux = String(kernel[..<slash]) + "/vmlinux"
        return access(vmlinux, R_OK) == 0 ? vmlinux : kernel
    }
    /// Next to the bzImage (kernel.sh writes both).
    public var kernelReleaseFile: String { String(kernel[..<(kernel.lastIndex(of: "/") ?? kernel.startIndex)]) + "/release" }
    /// The built images; `UVM_IMAGES` names one build's directory, so that checkouts building
    /// different agents (tests in several worktrees) do not share the `current` pointer.
    public var imagesDir: String { imagesOverride ?? installedShare.map { "\($0)/images" } ?? "\(cacheDir)/images/current" }
    public var initramfs: String { initramfsOverride ?? "\(imagesDir)/initramfs.cpio" }
    /// A distro as built by `make images`: the template a user's disk is copied from.
    public func distroTemplate(_ name: String) -> String { "\(imagesDir)/\(name).ext4" }
    /// The user's own disk of a distro (WSL's ext4.vhdx).
    public func distroDisk(_ name: String) -> String { "\(dataDir)/distros/\(name)/disk.ext4" }
    public var distrosDir: String { "\(dataDir)/distros" }
    /// Where `uvm import` writes the plain tar it hands uvmd (next to the disks it becomes: the
    /// same file system, and not a tmpfs that a 1 GiB root file system would fill).
    public var spoolDir: String { "\(dataDir)/spool" }
    /// The spool files: an import's tar (which a client names to uvmd) and an export's scratch disk.
    public enum SpoolKind: String, Sendable, CaseIterable {
        case `import`, export
    }

    /// A spool file of `kind`: directly in `spoolDir`, `KIND-...`.
    public func isSpoolFile(_ path: String, _ kind: SpoolKind = .import) -> Bool {
        guard path.hasPrefix(spoolDir + "/") else { return false }
        let name = path.dropFirst(spoolDir.count + 1)
        return name.hasPrefix(kind.rawValue + "-") && !name.contains("/") && !name.contains("..")
    }

    /// A new, empty spool file of `kind` (`KIND-PID-XXXXXX.tar`, mode 0600, close-on-exec), its
    /// folder made if needed; nil with errno set when it cannot be made.
    public func createSpoolFile(_ kind: SpoolKind) -> (fd: Int32, path: String)? {
        mkdir(dataDir, 0o700)
        mkdir(spoolDir, 0o700)
        var template = Array("\(spoolDir)/\(kind.rawValue)-\(getpid())-XXXXXX.tar".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemps($0.baseAddress!, 4) }
        guard fd >= 0 else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return (fd, template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
    }
    /// The distro chosen with `uvm default` (WSL's --set-default).
    public var defaultDistroFile: String { "\(dataDir)/default-distro" }

    /// The libvirt domain name: one VM per user and per UVM_HOME.
    public var domainName: String {
        let uid = getuid()
        guard let home else { return "uvm-\(uid)" }
        // FNV-1a keeps the name short and stable for a given UVM_HOME.
        var h: UInt64 = 0xcbf29ce484222325
        for b in home.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        return "uvm-\(uid)-\(String(h & 0xffffffff, radix: 16))"
    }

    public init(home: String?, stateDir: String, dataDir: String, cacheDir: String, configFile: String) {
        self.home = home
        self.stateDir = stateDir
        self.dataDir = dataDir
        self.cacheDir = cacheDir
        self.configFile = configFile
    }
}

/// Distro names become disk serials (20 bytes at most) and paths.
public func validDistroName(_ name: String) -> Bool {
    !name.isEmpty && name.utf8.count <= 16 && name.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." } && name.first != "."
}

/// The user's home from the password database, for when $HOME is not set.
func homeDirectory() -> String {
    guard let pw = getpwuid(getuid()), let dir = pw.pointee.pw_dir else { return "/" }
    return String(cString: dir)
}
