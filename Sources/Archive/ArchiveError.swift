import Glibc

/// What went wrong, and where: the entry's name (as far as it was known) and the byte offset of
/// its header in the archive, so a bad tarball can be located with `dd`/`hexdump`.
public struct ArchiveError: Error, CustomStringConvertible, Sendable, Equatable {
    public var message: String
    public var entry: String?
    public var offset: UInt64?
    public var errno: Int32?

    public init(_ message: String, entry: String? = nil, offset: UInt64? = nil, errno: Int32? = nil) {
        self.message = message
        self.entry = entry
        self.offset = offset
        self.errno = errno
    }

    public var description: String {
        var s = ""
        if let entry { s += "entry '\(entry)'" }
        if let offset { s += (s.isEmpty ? "" : " ") + "at byte \(offset)" }
        return s.isEmpty ? message : s + ": " + message
    }

    /// A failed system call: "what: strerror".
    static func sys(_ what: String, _ err: Int32 = Glibc.errno) -> ArchiveError {
        ArchiveError("\(what): \(String(cString: strerror(err)))", errno: err)
    }
}

/// Bytes as a readable name (invalid UTF-8 repaired) for messages only.
func display(_ bytes: some Sequence<UInt8>) -> String {
    String(decoding: Array(bytes), as: UTF8.self)
}
