import CLibvirt

/// A failed libvirt call, with libvirt's own message (virGetLastError).
public struct LibvirtError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The daemon's socket could not be reached: libvirtd (or virtqemud) is not running.
        case daemonUnreachable
        /// The connection to the daemon was lost after it was opened.
        case connectionClosed
        /// No domain of that name or uuid.
        case noDomain
        /// Anything else; see `message`.
        case failed
    }

    public var kind: Kind
    /// What we were doing, e.g. "create domain".
    public var operation: String
    /// The connection URI, when known.
    public var uri: String?
    /// libvirt's message.
    public var message: String
    /// libvirt's virErrorNumber and virErrorDomain, for logs.
    public var code: Int32
    public var domain: Int32

    public init(kind: Kind, operation: String, uri: String?, message: String, code: Int32 = 0, domain: Int32 = 0) {
        self.kind = kind
        self.operation = operation
        self.uri = uri
        self.message = message
        self.code = code
        self.domain = domain
    }

    public var description: String {
        let at = uri ?? "libvirt"
        switch kind {
        case .daemonUnreachable:
            if at.contains("session") {
                return "libvirt's session daemon cannot be reached (\(at)): is libvirt-daemon installed? (\(message))"
            }
            return "libvirt is not running (\(at)): start it with `make setup`, or as root "
                + "`virtlogd -d && libvirtd -d`, or `systemctl start libvirtd` (\(message))"
        case .connectionClosed:
            return "lost the connection to libvirt (\(at)) during \(operation): \(message)"
        case .noDomain, .failed:
            return "libvirt: \(operation) failed (\(at)): \(message)"
        }
    }

    /// Builds the error from this thread's last libvirt error; call it right after the failing
    /// call, on the same thread (libvirt keeps the last error per thread).
    static func last(operation: String, uri: String?, opening: Bool = false) -> LibvirtError {
        guard let err = virGetLastError() else {
            return LibvirtError(
                kind: .failed, operation: operation, uri: uri, message: "no error recorded by libvirt")
        }
        let code = err.pointee.code
        let domain = err.pointee.domain
        let message = err.pointee.message.map { String(cString: $0) } ?? "error \(code)"
        virResetLastError()

        let kind: Kind
        switch (code, domain) {
        case (Int32(VIR_ERR_NO_DOMAIN.rawValue), _):
            kind = .noDomain
        case (Int32(VIR_ERR_SYSTEM_ERROR.rawValue), Int32(VIR_FROM_RPC.rawValue)) where opening:
            // "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory"
            // (or Connection refused): nobody listens there.
            kind = .daemonUnreachable
        case (Int32(VIR_ERR_NO_CONNECT.rawValue), _) where opening:
            kind = .daemonUnreachable
        case (Int32(VIR_ERR_INVALID_CONN.rawValue), _),
            (Int32(VIR_ERR_SYSTEM_ERROR.rawValue), Int32(VIR_FROM_RPC.rawValue)):
            kind = .connectionClosed
        case (Int32(VIR_ERR_INTERNAL_ERROR.rawValue), Int32(VIR_FROM_RPC.rawValue))
        where message.contains("client socket is closed"):
            kind = .connectionClosed
        default:
            kind = .failed
        }
        return LibvirtError(kind: kind, operation: operation, uri: uri, message: message, code: code, domain: domain)
    }
}
