import Archive
import CSyscalls
import Glibc
import NIOCore
import Synchronization
import Wire

/// `uvm cp` in the guest: a tar extracted beneath a distribution's root, or one made from paths
/// there. Paths are resolved as a process chrooted in the instance would see them (its mounts
/// and shares included; see CopyRoot), so no name or symlink in the distro leads outside it. The
/// agent works as root, as `docker cp` does; new files belong to the user unless owners are kept.
enum FileCopy {
    typealias Outbound = NIOAsyncChannelOutboundWriter<Frame>

    static func copyIn(_ r: GuestCopyInRequest, instances: Instances, inbound: AsyncStream<Frame>,
                       outbound: Outbound) async throws -> CopyResult {
        let c = r.copy
        let (root, account) = try await open(c.distro, disk: r.distroDisk, user: c.user, instances: instances)
        defer { close(root.fd) }
        let destination = absolute(c.destination, home: account.home)
        var options = ExtractOptions()
        options.preserveOwnership = c.keepOwners
        if !c.keepOwners {
            options.owner = ExtractOptions.Owner(uid: account.uid, gid: account.gid)
            options.clearedModeBits = UInt32(S_ISUID | S_ISGID)
        }
        let fd: Int32
        do {
            if let names = c.names {
                let placed = try CopyPaths.destination(destination, names: names, root: root)
                fd = placed.fd
                options.topLevelNames = placed.names
            } else {
                fd = root.open(destination, flags: O_RDONLY | O_DIRECTORY)
                guard fd >= 0 else {
                    let e = errno
                    throw ArchiveError("\(destination): \(String(cString: strerror(e))) (a tar stream is extracted into a directory)", errno: e)
                }
            }
        } catch let e as ArchiveError {
            throw WireError(.badRequest, "\(c.distro ?? "?"):\(e)")
        }
        let extractor = Unchecked(TarExtractor(destinationFD: fd, options: options))
        var bytes: UInt64 = 0
        do {
            for await frame in inbound {
                switch frame.kind {
                case .stdin:
                    let chunk = frame.payload
                    try await blocking { try chunk.withUnsafeReadableBytes { try extractor.value.feed($0) } }
                    bytes += UInt64(chunk.readableBytes)
                    try await outbound.write(.stdinAck(chunk.readableBytes))
                case .stdinEOF:
                    let stats = try await blocking { try extractor.value.finish() }
                    await boundedSync()
                    return CopyResult(entries: stats.entries, bytes: bytes)
                case .signal:
                    throw WireError(.badRequest, "the copy was interrupted; what arrived so far stays")
                default:
                    throw WireError(.protocolError, "unexpected \(frame.kind) frame in a copy")
                }
            }
        } catch let e as ArchiveError {
            throw WireError(.badRequest, "copying into \(c.distro ?? "?"):\(destination): \(e)"
                + (e.errno == ENOSPC ? " (the distro's disk is full: `uvm manage \(c.distro ?? "NAME") --resize`)" : ""))
        }
        throw WireError(.badRequest, "the copy ended before its tar did")
    }

    static func copyOut(_ r: GuestCopyOutRequest, instances: Instances, outbound: Outbound) async throws -> CopyResult {
        let c = r.copy
        let (root, account) = try await open(c.distro, disk: r.distroDisk, user: c.user, instances: instances)
        defer { close(root.fd) }
        let sources = c.sources.map { absolute($0, home: account.home) }
        let distro = c.distro ?? "?"
        // On a thread of its own: a large tree would hold one of the few pool threads for minutes.
        return try await onOwnThread {
            let tar = TarWriter(bufferSize: 512 << 10) { chunk in try writeBlocking(Frame(.stdout, ByteBuffer(bytes: chunk)), outbound) }
            do {
                try CopyPaths.send(sources, root: root, recursive: c.recursive, to: tar)
                try tar.finish()
            } catch let e as ArchiveError {
                throw WireError(.badRequest, "\(distro):\(e)")
            }
            return CopyResult(entries: tar.stats.entries, bytes: tar.stats.bytesWritten)
        }
    }

    /// The running instance (started if need be), the user, and a descriptor of its root.
    private static func open(_ distro: String?, disk: String, user: String?, instances: Instances) async throws -> (CopyRoot, Account) {
        guard let distro else { throw WireError(.badRequest, "copy: no distro given") }
        let instance = try await instances.instance(distro, diskSerial: disk)
        let account = try instance.account(user)
        let fd = Glibc.open(instance.rootPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw WireError(.internalError, "open \(instance.rootPath): \(String(cString: strerror(errno)))") }
        return (CopyRoot(fd: fd), account)
    }

    /// As scp: a relative path is in the user's home.
    static func absolute(_ path: String, home: String) -> String {
        if path.hasPrefix("/") { return path }
        if path.isEmpty || path == "." { return home }
        return home.hasSuffix("/") ? home + path : home + "/" + path
    }
}

/// A non-Sendable value handed between the session's task and the thread pool, one at a time.
private final class Unchecked<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
