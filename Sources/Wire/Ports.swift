/// A TCP socket listening in the guest on a loopback or wildcard address: what the port tracker
/// in the agent reports, and what uvmd forwards from the host's loopback.
public struct ListeningPort: Codable, Sendable, Equatable, Hashable {
    public var port: UInt16
    /// Guest addresses it listens on: any of 0.0.0.0, 127.0.0.1, ::, ::1.
    public var addresses: [String]
    /// The distro whose process owns the socket (nil: the agent itself, or not found).
    public var distro: String?
    /// Its pid as seen inside that distro, and its command name.
    public var pid: Int32?
    public var process: String?

    public init(port: UInt16, addresses: [String], distro: String? = nil, pid: Int32? = nil, process: String? = nil) {
        self.port = port
        self.addresses = addresses
        self.distro = distro
        self.pid = pid
        self.process = process
    }
}

/// One line of `uvm ports`.
public struct ForwardedPort: Codable, Sendable, Equatable {
    public var port: UInt16
    public var guest: ListeningPort
    /// Host addresses accepting connections for it (127.0.0.1, ::1); empty when none could be bound.
    public var hostAddresses: [String]
    /// Why it is not forwarded (or only partly), e.g. the host port is taken.
    public var error: String?

    public init(guest: ListeningPort, hostAddresses: [String], error: String? = nil) {
        self.port = guest.port
        self.guest = guest
        self.hostAddresses = hostAddresses
        self.error = error
    }
}
