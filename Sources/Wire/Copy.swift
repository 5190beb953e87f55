/// `uvm cp`: files into and out of a distribution, as a tar stream (the Archive module's format)
/// between the CLI, which reads or writes the host's side, and the guest agent, which reads or
/// writes beneath the distribution's root. The receiving side applies cp's rules (DEST a
/// directory: into it; else DEST is the one source's new name) and accepts only the names it was
/// told, so a hostile peer cannot write beside the destination.

/// Into a distro: then the tar as `stdin` frames (each acknowledged with `stdinAck`, as exec's
/// stdin is), `stdinEOF` at its end; answers `CopyResult` once everything is in place.
public struct CopyInRequest: DaemonCall {
    public typealias Response = CopyResult
    public var distro: String?
    /// In the distro: absolute, or relative to the user's home (as scp).
    public var destination: String
    /// Top-level names in the tar (the sources' names); nil: a tar from the user (`uvm cp -`),
    /// extracted as it is into `destination`, which must be a directory.
    public var names: [String]?
    /// Whose the new files are (default: the distro's default user); also whose home a relative
    /// destination is in.
    public var user: String?
    /// Keep the tar's numeric owners and setuid/setgid bits (`-a`); else new files are `user`'s.
    public var keepOwners: Bool
    public init(distro: String?, destination: String, names: [String]?, user: String?, keepOwners: Bool) {
        (self.distro, self.destination, self.names, self.user, self.keepOwners) = (distro, destination, names, user, keepOwners)
    }
    public var request: DaemonRequest { .copyIn(self) }
}

/// Out of a distro: `stdout` frames carry a tar of `sources`, each under its own name (the last
/// component of its path); answers `CopyResult` after the last of them.
public struct CopyOutRequest: DaemonCall {
    public typealias Response = CopyResult
    public var distro: String?
    /// In the distro: absolute, or relative to the user's home.
    public var sources: [String]
    public var user: String?
    /// Directories with everything beneath them, symlinks as links (cp -R); without it a
    /// directory is refused and a symlink followed.
    public var recursive: Bool
    public init(distro: String?, sources: [String], user: String?, recursive: Bool) {
        (self.distro, self.sources, self.user, self.recursive) = (distro, sources, user, recursive)
    }
    public var request: DaemonRequest { .copyOut(self) }
}

public struct CopyResult: Codable, Sendable, Equatable {
    /// Entries archived or extracted.
    public var entries: Int
    /// Tar bytes that crossed.
    public var bytes: UInt64
    public init(entries: Int, bytes: UInt64) { (self.entries, self.bytes) = (entries, bytes) }
}

/// uvmd -> agent: the request with the distro resolved and its disk's serial.
public struct GuestCopyInRequest: Codable, Sendable, Equatable {
    public var copy: CopyInRequest
    public var distroDisk: String
    public init(copy: CopyInRequest, distroDisk: String) { (self.copy, self.distroDisk) = (copy, distroDisk) }
}

public struct GuestCopyOutRequest: Codable, Sendable, Equatable {
    public var copy: CopyOutRequest
    public var distroDisk: String
    public init(copy: CopyOutRequest, distroDisk: String) { (self.copy, self.distroDisk) = (copy, distroDisk) }
}
