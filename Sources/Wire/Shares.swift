#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A host folder shown in every distro at `/mnt/host/NAME`.
public struct ShareSpec: Codable, Sendable, Equatable {
    public var name: String
    /// Absolute host path (the CLI resolves it against its working directory).
    public var path: String
    public var readOnly: Bool
    /// WSL's "metadata": guest owners and modes kept in xattrs.
    public var metadata: Bool
    /// Benchmarks: serve the share with this shell command (speaking 9P on its stdin and stdout,
    /// e.g. diod) instead of uvm's own server, over the same port and relay.
    public var serverCommand: String?
    /// Benchmarks: mount through the virtio-serial port and the guest's relay even when the VM has
    /// the shared-memory transport, to compare the two in one run.
    public var viaPort: Bool?

    public init(name: String, path: String, readOnly: Bool = false, metadata: Bool = false, serverCommand: String? = nil,
                viaPort: Bool? = nil) {
        self.name = name
        self.path = path
        self.readOnly = readOnly
        self.metadata = metadata
        self.serverCommand = serverCommand
        self.viaPort = viaPort
    }

    public static let guestRoot = "/mnt/host"
    public var guestPath: String { "\(Self.guestRoot)/\(name)" }
}

/// A share as `uvm share list` shows it.
public struct ShareStatus: Codable, Sendable, Equatable {
    public var share: ShareSpec
    public var guestPath: String
    /// "config" for the default home share, "user" for `uvm share add`.
    public var source: String
    /// "mounted" in the running VM, "pending" (mounted at the next boot), or "failed: why".
    public var state: String
    /// 9P requests the share's server has answered since it was mounted, by type ("walk": 12):
    /// what the guest's file operations cost in round trips. nil when not mounted.
    public var requests: [String: Int]?
    public init(share: ShareSpec, source: String, state: String, requests: [String: Int]? = nil) {
        self.share = share
        self.guestPath = share.guestPath
        self.source = source
        self.state = state
        self.requests = requests
    }
}

/// uvmd -> guest: mount share `name` from the 9P port `port` (a virtio-serial port name).
public struct MountRequest: Codable, Sendable, Equatable {
    public var name: String
    public var port: String
    public var readOnly: Bool
    public var msize: UInt32
    /// What the guest attaches to (Tattach aname); nil: the share's name. diod wants its export path.
    public var aname: String?
    /// The channel of the kernel's shared-memory transport (`trans=uvmshm`) to mount; nil: the
    /// virtio-serial `port` through the guest's relay.
    public var channel: Int?
    /// Mount with cache=meta: the guest caches attributes and entries, and the server tells it of
    /// every change on the host (the kernel falls back to cache=mmap with a server that cannot).
    /// nil: cache=mmap.
    public var metadataCache: Bool?
    public init(name: String, port: String, readOnly: Bool = false, msize: UInt32 = 512 * 1024, aname: String? = nil,
                channel: Int? = nil, metadataCache: Bool? = nil) {
        self.metadataCache = metadataCache
        self.name = name
        self.port = port
        self.readOnly = readOnly
        self.msize = msize
        self.aname = aname
        self.channel = channel
    }
}
