/// Distributions: import, export, unregister, default, terminate (WSL's `--import`, `--export`,
/// `--unregister`, `--set-default`, `--terminate`). `uvm install` builds a root file system on the
/// host (as the user, with the recipe in images/) and imports it like any other tarball.

/// A distribution as `uvm list`, install and import describe it.
public struct DistroInfo: Codable, Sendable, Equatable {
    public var name: String
    /// os-release's PRETTY_NAME, when known.
    public var prettyName: String?
    public var disk: String
    /// The disk's maximum size and what it takes on the host (it is sparse).
    public var sizeBytes: UInt64
    public var allocatedBytes: UInt64
    public var isDefault: Bool
    public init(name: String, prettyName: String? = nil, disk: String, sizeBytes: UInt64, allocatedBytes: UInt64, isDefault: Bool) {
        self.name = name
        self.prettyName = prettyName
        self.disk = disk
        self.sizeBytes = sizeBytes
        self.allocatedBytes = allocatedBytes
        self.isDefault = isDefault
    }
}

/// A new distribution from a root file system tarball. The client first writes the plain
/// (decompressed) tar to a file in uvmd's spool folder (`Paths.spoolDir`, a name starting with
/// `import-`) and names it in `spool`; uvmd owns that file from then on and deletes it when the
/// import ends, whatever its outcome. The guest reads the tar from that file attached read-only
/// as a disk: a virtio-blk disk moves bulk bytes tens of times faster than a virtio-serial stream.
/// The client may send `signal` to cancel.
///
/// `uvm install` names `image` instead: an ext4 image of the root file system that its recipe
/// built next to the cached tarball, which uvmd copies and grows to the disk's size, so that
/// nothing is extracted in the VM (the guest only adds the default user).
public struct ImportRequest: DaemonCall {
    public typealias Response = DistroInfo
    public var name: String
    public var spool: String
    public var image: String?
    public var sizeBytes: UInt64?
    public var setDefault: Bool
    public init(name: String, spool: String, image: String? = nil, sizeBytes: UInt64? = nil, setDefault: Bool = false) {
        self.name = name
        self.spool = spool
        self.image = image
        self.sizeBytes = sizeBytes
        self.setDefault = setDefault
    }
    public var request: DaemonRequest { .importDistro(self) }
}

/// A distribution's root as an uncompressed tar stream: `stdout` frames, then the response.
public struct ExportRequest: DaemonCall {
    public typealias Response = ExportResult
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .export(self) }
}

public struct ExportResult: Codable, Sendable, Equatable {
    public var bytes: UInt64
    /// Sockets and the like, which a tarball cannot hold.
    public var skipped: Int
    public init(bytes: UInt64, skipped: Int) {
        self.bytes = bytes
        self.skipped = skipped
    }
}

/// Stop the instance and delete the distribution's disk.
public struct UnregisterRequest: DaemonCall {
    public typealias Response = Done
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .unregister(self) }
}

public struct SetDefaultRequest: DaemonCall {
    public typealias Response = Done
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .setDefault(self) }
}

/// Stop one instance now (its processes get SIGTERM, then SIGKILL).
public struct TerminateRequest: DaemonCall {
    public typealias Response = Done
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .terminate(self) }
}

/// `uvm manage NAME --resize SIZE`: the disk's maximum size, grown or shrunk with its file system.
/// The instance is stopped first.
public struct ResizeRequest: DaemonCall {
    public typealias Response = DistroInfo
    public var name: String
    public var sizeBytes: UInt64
    public init(name: String, sizeBytes: UInt64) {
        self.name = name
        self.sizeBytes = sizeBytes
    }
    public var request: DaemonRequest { .resize(self) }
}

/// `uvm manage NAME --compact`: blocks the distro's file system no longer uses go back to the
/// host (FITRIM in the guest, passed down as discards to the sparse file). The instance keeps
/// running.
public struct CompactRequest: DaemonCall {
    public typealias Response = CompactResult
    public var name: String
    public init(name: String) { self.name = name }
    public var request: DaemonRequest { .compact(self) }
}

public struct CompactResult: Codable, Sendable, Equatable {
    public var name: String
    /// What the disk took on the host before and after.
    public var allocatedBeforeBytes: UInt64
    public var allocatedAfterBytes: UInt64
    public var sizeBytes: UInt64
    /// What the guest's file system passed down as free.
    public var trimmedBytes: UInt64
    public init(name: String, allocatedBeforeBytes: UInt64, allocatedAfterBytes: UInt64, sizeBytes: UInt64, trimmedBytes: UInt64) {
        self.name = name
        self.allocatedBeforeBytes = allocatedBeforeBytes
        self.allocatedAfterBytes = allocatedAfterBytes
        self.sizeBytes = sizeBytes
        self.trimmedBytes = trimmedBytes
    }
}

// MARK: uvmd -> guest

/// The user a new distribution gets as its default (the host user's name, uid and gid).
public struct DefaultUser: Codable, Sendable, Equatable {
    public var name: String
    public var uid: UInt32
    public var gid: UInt32
    public init(name: String, uid: UInt32, gid: UInt32) {
        self.name = name
        self.uid = uid
        self.gid = gid
    }
}

/// Extract the tar held by the read-only disk `sourceSerial` (its first `sourceBytes` bytes) onto
/// the empty ext4 disk `diskSerial`; without a source, the disk holds the root file system
/// already (an image) and is only checked and given its default user. uvmd may send `signal` to
/// cancel.
public struct ImportDistroRequest: GuestCall {
    public typealias Response = ImportedDistro
    public var name: String
    public var diskSerial: String
    public var sourceSerial: String?
    public var sourceBytes: UInt64
    /// Created (with password-less sudo) unless nil or it exists.
    public var defaultUser: DefaultUser?
    public init(name: String, diskSerial: String, sourceSerial: String?, sourceBytes: UInt64, defaultUser: DefaultUser?) {
        self.name = name
        self.diskSerial = diskSerial
        self.sourceSerial = sourceSerial
        self.sourceBytes = sourceBytes
        self.defaultUser = defaultUser
    }
    public var request: GuestRequest { .importDistro(self) }
}

public struct ImportedDistro: Codable, Sendable, Equatable {
    public var prettyName: String?
    public var entries: Int
    public init(prettyName: String?, entries: Int) {
        self.prettyName = prettyName
        self.entries = entries
    }
}

/// The distribution's root as a tar written from the start of the empty disk `targetSerial` (a
/// sparse file of uvmd's, `targetBytes` long, which uvmd then streams to the client: a
/// virtio-blk disk moves bulk bytes far faster than the virtio-serial channel), then
/// `ExportResult` with the tar's length.
public struct ExportDistroRequest: GuestCall {
    public typealias Response = ExportResult
    public var name: String
    public var diskSerial: String
    public var targetSerial: String
    public var targetBytes: UInt64
    public init(name: String, diskSerial: String, targetSerial: String, targetBytes: UInt64) {
        self.name = name
        self.diskSerial = diskSerial
        self.targetSerial = targetSerial
        self.targetBytes = targetBytes
    }
    public var request: GuestRequest { .exportDistro(self) }
}

/// Stop the instance if it runs and let go of the disk (before it is detached).
public struct ReleaseDiskRequest: GuestCall {
    public typealias Response = Done
    public var name: String
    public var diskSerial: String
    public init(name: String, diskSerial: String) {
        self.name = name
        self.diskSerial = diskSerial
    }
    public var request: GuestRequest { .releaseDisk(self) }
}
