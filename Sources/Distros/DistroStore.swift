#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CSyscalls
import Glibc
import Settings

/// Which distributions this user has, where their disks are, and which one is the default: the
/// one place uvmd, `uvm list` and `uvm doctor` ask. A distro is installed when its disk exists
/// (`$dataDir/distros/NAME/disk.ext4`, WSL's ext4.vhdx); one built by `make images` but not yet
/// installed has only a template, copied on first use.
public struct DistroStore: Sendable {
    public let paths: Paths
    /// The distro of `uvm` and `uvm exec` without --distro.
    public let defaultDistro: String

    /// `defaultDistro` as given (an explicit setting, or what the caller already resolved).
    public init(paths: Paths, defaultDistro: String) {
        self.paths = paths
        self.defaultDistro = defaultDistro
    }

    /// The default from the settings when they name one explicitly (uvm.conf, UVM_DEFAULT_DISTRO),
    /// else the one chosen with `uvm default` (or by the first import), else the built-in default.
    public init(paths: Paths, configuredDefault: String, explicit: Bool) {
        self.paths = paths
        self.defaultDistro = explicit ? configuredDefault : (Self.storedDefault(paths) ?? configuredDefault)
    }

    /// As uvmd, `uvm list` and `uvm doctor` see it.
    public init(paths: Paths, settings: Settings) {
        self.init(paths: paths, configuredDefault: settings.defaultDistro, explicit: settings.defaultDistroIsExplicit)
    }

    private static func storedDefault(_ paths: Paths) -> String? {
        guard let text = try? String(contentsOfFile: paths.defaultDistroFile, encoding: .utf8) else { return nil }
        let name = String(text.split(whereSeparator: { $0 == "\n" || $0 == " " }).first ?? "")
        return validDistroName(name) ? name : nil
    }

    /// Whether `uvm default` (or a first import) chose the default.
    public var hasChosenDefault: Bool { Self.storedDefault(paths) != nil }

    /// Back to the configured default (its distro was unregistered).
    public func forgetDefault() { unlink(paths.defaultDistroFile) }

    /// Remembers `name` as the default (written whole, then renamed: never half a name).
    public func setDefault(_ name: String) throws {
        try FileManager.default.createDirectory(atPath: paths.dataDir, withIntermediateDirectories: true)
        let tmp = paths.defaultDistroFile + ".new"
        try Data((name + "\n").utf8).write(to: URL(fileURLWithPath: tmp))
        guard rename(tmp, paths.defaultDistroFile) == 0 else {
            throw InstallError(description: "cannot write \(paths.defaultDistroFile): \(String(cString: strerror(errno)))")
        }
    }

    public struct Distro: Sendable, Equatable {
        public var name: String
        public var disk: String
    }

    public enum Availability: Sendable, Equatable {
        case installed(disk: String)
        /// Built by `make images`; installed (copied) when first used.
        case template(path: String)
        /// Its disk is being filled (`uvm import`, `uvm install`); gone if that fails.
        case importing
        case absent
    }

    /// Installed distros, by name. One being imported is not installed until the import ends.
    public func installed() -> [Distro] {
        ((try? FileManager.default.contentsOfDirectory(atPath: paths.distrosDir)) ?? [])
            .filter { validDistroName($0) && FileManager.default.fileExists(atPath: paths.distroDisk($0)) && !isImporting($0) }
            .sorted()
            .map { Distro(name: $0, disk: paths.distroDisk($0)) }
    }

    public func availability(_ name: String) -> Availability {
        guard validDistroName(name) else { return .absent }
        if isImporting(name) { return .importing }
        if FileManager.default.fileExists(atPath: paths.distroDisk(name)) { return .installed(disk: paths.distroDisk(name)) }
        if FileManager.default.fileExists(atPath: paths.distroTemplate(name)) { return .template(path: paths.distroTemplate(name)) }
        return .absent
    }

    /// Whether `name` can run (installed, or installable from its template).
    public func knows(_ name: String) -> Bool {
        switch availability(name) {
        case .installed, .template: true
        case .importing, .absent: false
        }
    }

    private func importMarker(_ name: String) -> String { "\(paths.distrosDir)/\(name)/importing" }
    private func isImporting(_ name: String) -> Bool { FileManager.default.fileExists(atPath: importMarker(name)) }

    /// The default maximum size of a new distro's disk (sparse: it takes what is written). WSL's is 1 TB.
    public static let defaultDiskSize: UInt64 = 64 << 30

    /// A new, empty ext4 disk for `name`, marked as being imported. Blocking (runs mkfs.ext4).
    /// Root owns the file system's root; the guest fills it. With `image`, the disk is a copy of
    /// that ext4 image instead.
    public func createEmptyDisk(_ name: String, sizeBytes: UInt64, from image: String? = nil) throws {
        let dir = "\(paths.distrosDir)/\(name)"
        try FileManager.default.createDirectory(atPath: paths.distrosDir, withIntermediateDirectories: true)
        // mkdir is the claim: of two imports of one name, one gets EEXIST.
        guard mkdir(dir, 0o700) == 0 else {
            throw InstallError(description: errno == EEXIST ? "distro \(name) exists or is being imported" : "cannot create \(dir): \(String(cString: strerror(errno)))")
        }
        // The marker first: a crash from here on leaves an import that `uvm unregister` (or the next
        // import of the name) clears, never a distro that looks installed.
        guard FileManager.default.createFile(atPath: importMarker(name), contents: nil) else {
            throw InstallError(description: "cannot create \(importMarker(name))")
        }
        let disk = paths.distroDisk(name)
        unlink(disk)
        if let image {
            // A recipe's image: copied (sparse), checked, and grown (or shrunk) to the size.
            try run(["cp", "--sparse=always", "--reflink=auto", image, disk], what: "copying \(image) to \(disk)")
            chmod(disk, 0o600)
            try resize(name, sizeBytes: sizeBytes)
            return
        }
        let fd = open(disk, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw InstallError(description: "cannot create \(disk): \(String(cString: strerror(errno)))") }
        let sized = ftruncate(fd, off_t(sizeBytes))
        let err = errno
        close(fd)
        guard sized == 0 else { throw InstallError(description: "cannot size \(disk) to \(sizeBytes) bytes: \(String(cString: strerror(err)))") }
        // lazy_itable_init: the inode tables are zeroed by the guest's kernel later, not written now.
        try run(["mkfs.ext4", "-q", "-F", "-L", String(name.prefix(16)), "-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1", disk],
                what: "mkfs.ext4 on \(disk)")
    }

    /// The import succeeded: `name` is installed.
    public func finishImport(_ name: String) {
        unlink(importMarker(name))
    }

    /// Deletes `name`'s disk and folder (an import that failed, `uvm unregister`).
    public func delete(_ name: String) throws {
        guard validDistroName(name) else { return }
        let dir = "\(paths.distrosDir)/\(name)"
        guard FileManager.default.fileExists(atPath: dir) else { return }
        try FileManager.default.removeItem(atPath: dir)
    }

    /// Grows or shrinks `name`'s disk and its file system to `sizeBytes` (blocking: e2fsck and
    /// resize2fs on the image; nothing may have it mounted). A shrink below what the files need is
    /// refused by resize2fs and changes nothing.
    public func resize(_ name: String, sizeBytes: UInt64) throws {
        let disk = paths.distroDisk(name)
        // resize2fs wants a freshly checked file system; -p repairs only what is safe to repair.
        try run(["e2fsck", "-f", "-p", disk], what: "e2fsck of \(name)'s disk", okStatuses: [0, 1 << 8])
        let current = diskUsage(name).size
        if sizeBytes > current { try setLength(disk, sizeBytes) }
        do {
            try run(["resize2fs", disk, "\(sizeBytes / 1024)K"], what: "resize2fs of \(name)'s disk to \(sizeBytes) bytes")
        } catch {
            if sizeBytes > current { try? setLength(disk, current) }
            throw InstallError(description: "\(error) (a shrink needs room for the files already there)")
        }
        if sizeBytes < current { try setLength(disk, sizeBytes) }
    }

    private func setLength(_ path: String, _ bytes: UInt64) throws {
        guard truncate(path, off_t(bytes)) == 0 else {
            throw InstallError(description: "cannot size \(path) to \(bytes) bytes: \(String(cString: strerror(errno)))")
        }
    }

    /// The disk's maximum and allocated size.
    public func diskUsage(_ name: String) -> (size: UInt64, allocated: UInt64) {
        var st = stat()
        guard stat(paths.distroDisk(name), &st) == 0 else { return (0, 0) }
        return (UInt64(st.st_size), UInt64(st.st_blocks) * 512)
    }

    private func run(_ args: [String], what: String, okStatuses: Set<Int32> = [0]) throws {
        do {
            try runHostTool(args, what: what, okStatuses: okStatuses)
        } catch let e as HostToolError {
            throw InstallError(description: e.description)
        }
    }

    /// Installed distros and the default (installed or not): what `uvm list` shows.
    public func listed() -> [String] {
        Set(installed().map(\.name)).union([defaultDistro]).sorted()
    }

    public struct InstallError: Error, CustomStringConvertible {
        public var description: String
    }

    /// The default distro installed from its template if needed, then every installed disk and
    /// every disk being imported.
    /// Blocking (it copies a disk image): call it off the cooperative pool and event loops.
    public func prepareForBoot() throws -> [Distro] {
        try FileManager.default.createDirectory(atPath: paths.distrosDir, withIntermediateDirectories: true)
        switch availability(defaultDistro) {
        case .installed: break
        case .template(let template): try install(defaultDistro, from: template)
        case .importing:
            throw InstallError(description: "distro \(defaultDistro) is still being imported (or its import was interrupted: `uvm unregister \(defaultDistro)`)")
        case .absent:
            throw InstallError(description: "distro \(defaultDistro) is not built (expected \(paths.distroTemplate(defaultDistro))): run `make images`")
        }
        // Disks being imported too: an import that boots the VM needs no hot-plug.
        let importing = ((try? FileManager.default.contentsOfDirectory(atPath: paths.distrosDir)) ?? [])
            .filter { validDistroName($0) && isImporting($0) && FileManager.default.fileExists(atPath: paths.distroDisk($0)) }
            .map { Distro(name: $0, disk: paths.distroDisk($0)) }
        return (installed() + importing).sorted { $0.name < $1.name }
    }

    /// Copies `template` to the distro's disk (sparse; reflinked where the file system can), through
    /// a temporary name so that a half-copied disk never counts as installed. Blocking.
    public func install(_ name: String, from template: String) throws {
        let disk = paths.distroDisk(name)
        try FileManager.default.createDirectory(atPath: String(disk[..<(disk.lastIndex(of: "/") ?? disk.endIndex)]), withIntermediateDirectories: true)
        let tmp = disk + ".partial"
        do {
            try run(["cp", "--sparse=always", "--reflink=auto", template, tmp], what: "copying \(template) to \(tmp)")
        } catch {
            unlink(tmp)
            throw InstallError(description: "cannot copy \(template) to \(tmp)")
        }
        try FileManager.default.moveItem(atPath: tmp, toPath: disk)
    }
}

public struct HostToolError: Error, CustomStringConvertible {
    public var description: String
}

/// Runs a host tool (from /usr/sbin too, which an ordinary user's PATH lacks): stdin and stdout
/// /dev/null, stderr kept, no other descriptor of the caller's. A failure says which and its
/// status. Blocking: call it off the cooperative pool.
public func runHostTool(_ args: [String], what: String, okStatuses: Set<Int32> = [0]) throws {
    let tool = ["/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"].map { $0 + args[0] }.first { access($0, X_OK) == 0 }
    guard let tool else { throw HostToolError(description: "\(args[0]) is not installed: run `make setup`") }
    let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    let pid = uvm_spawn_with_fds(tool, argv, -1, -1, 2)
    var status: Int32 = -1
    if pid > 0 { while waitpid(pid, &status, 0) < 0 && errno == EINTR {} }
    guard pid > 0, okStatuses.contains(status) else { throw HostToolError(description: "\(what) failed (status \(status >> 8))") }
}
