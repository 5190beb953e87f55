/// `uvm mount`: a distro's files served over 9P2000.L by the guest agent, relayed by uvmd.

/// CLI -> uvmd: serve `distro`'s root file system over 9P on this session.
public struct FilesRequest: Codable, Sendable, Equatable {
    /// nil: the default distro.
    public var distro: String?
    /// Whose rights the server has and who owns what it creates (nil: the distro's default user).
    public var user: String?
    public init(distro: String? = nil, user: String? = nil) {
        self.distro = distro
        self.user = user
    }
}

/// uvmd -> guest agent: `FilesRequest` with the distro's disk resolved.
public struct ServeFilesRequest: Codable, Sendable, Equatable {
    public var distro: String
    /// Serial of the distro's disk (`uvm-NAME`), to start its instance if it is not running.
    public var distroDisk: String
    public var user: String?
    public init(distro: String, distroDisk: String, user: String? = nil) {
        self.distro = distro
        self.distroDisk = distroDisk
        self.user = user
    }
}

/// The `event` frame before the 9P bytes: whom the server acts as, so that the host side can show
/// that user's files as the host user's.
public struct ServeFilesReady: Codable, Sendable, Equatable {
    public var user: String
    public var uid: UInt32
    public var gid: UInt32
    public init(user: String, uid: UInt32, gid: UInt32) {
        self.user = user
        self.uid = uid
        self.gid = gid
    }
}
