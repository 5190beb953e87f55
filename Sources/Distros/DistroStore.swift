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
    public let defaultDistro: String

    public init(paths: Paths, defaultDistro: String) {
        self.paths = paths
        self.defaultDistro = defaultDistro
    }

    public struct Distro: Sendable, Equatable {
        public var name: String
        public var disk: String
    }

    public enum Availability: Sendable, Equatable {
        case installed(disk: String)
        /// Built by `make images`; installed (copied) when first used.
        case template(path: String)
        case absent
    }

    /// Installed distros, by name.
    public func installed() -> [Distro] {
        ((try? FileManager.default.contentsOfDirectory(atPath: paths.distrosDir)) ?? [])
            .filter { validDistroName($0) && FileManager.default.fileExists(atPath: paths.distroDisk($0)) }
            .sorted()
            .map { Distro(name: $0, disk: paths.distroDisk($0)) }
    }

    public func availability(_ name: String) -> Availability {
        guard validDistroName(name) else { return .absent }
        if FileManager.default.fileExists(atPath: paths.distroDisk(name)) { return .installed(disk: paths.distroDisk(name)) }
        if FileManager.default.fileExists(atPath: paths.distroTemplate(name)) { return .template(path: paths.distroTemplate(name)) }
        return .absent
    }

    /// Whether `name` can run (installed, or installable from its template).
    public func knows(_ name: String) -> Bool { availability(name) != .absent }

    /// Installed distros and the default (installed or not): what `uvm list` shows.
    public func listed() -> [String] {
        Set(installed().map(\.name)).union([defaultDistro]).sorted()
    }

    public struct InstallError: Error, CustomStringConvertible {
        public var description: String
    }

    /// The default distro installed from its template if needed, then every installed disk.
    /// Blocking (it copies a disk image): call it off the cooperative pool and event loops.
    public func prepareForBoot() throws -> [Distro] {
        try FileManager.default.createDirectory(atPath: paths.distrosDir, withIntermediateDirectories: true)
        switch availability(defaultDistro) {
        case .installed: break
        case .template(let template): try install(defaultDistro, from: template)
        case .absent:
            throw InstallError(description: "distro \(defaultDistro) is not built (expected \(paths.distroTemplate(defaultDistro))): run `make images`")
        }
        return installed()
    }

    /// Copies `template` to the distro's disk (sparse; reflinked where the file system can), through
    /// a temporary name so that a half-copied disk never counts as installed. Blocking.
    public func install(_ name: String, from template: String) throws {
        let disk = paths.distroDisk(name)
        try FileManager.default.createDirectory(atPath: String(disk[..<(disk.lastIndex(of: "/") ?? disk.endIndex)]), withIntermediateDirectories: true)
        let tmp = disk + ".partial"
        let args: [String] = ["cp", "--sparse=always", "--reflink=auto", template, tmp]
        let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // stdin/stdout to /dev/null, stderr kept, no other descriptor of uvmd's.
        let pid = uvm_spawn_with_fds("/bin/cp", argv, -1, -1, 2)
        var status: Int32 = -1
        if pid > 0 { while waitpid(pid, &status, 0) < 0 && errno == EINTR {} }
        guard pid > 0, status == 0 else {
            unlink(tmp)
            throw InstallError(description: "cannot copy \(template) to \(tmp)")
        }
        try FileManager.default.moveItem(atPath: tmp, toPath: disk)
    }
}
