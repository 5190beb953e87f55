import Archive
import CSyscalls
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Wire

/// A distribution's disk outside its instance: filled from a tar stream (`uvm import`, `uvm
/// install`), read into one (`uvm export`), let go of before uvmd detaches it (`uvm unregister`).
/// The guest is root in its VM, so owners, devices and capabilities arrive exactly without root
/// on the host.
enum DistroDisks {
    static let workDir = "/run/uvm/disks"

    /// Waits for a hot-plugged disk to show up (PCIe hot-plug and the virtio probe take a moment).
    static func device(serial: String, distro: String? = nil, within seconds: Double = 20) async throws -> String {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while true {
            if let d = Instances.findDisk(serial: serial) { return d }
            guard ContinuousClock.now < deadline else {
                throw WireError(.notFound, (distro.map { "distro \($0): " } ?? "")
                    + "its disk (serial \(serial)) did not appear in the VM within \(Int(seconds)) s")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Extracts the tar on the read-only source disk onto the empty disk (or takes the disk as it
    /// is, an image), checks it is a root file system, adds the default user, and unmounts it. A `signal` from uvmd, or the session's
    /// end, cancels.
    static func importDistro(_ r: ImportDistroRequest, inbound: AsyncStream<Frame>,
                             outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws -> ImportedDistro {
        let target = try await device(serial: r.diskSerial)
        var source: String?
        if let serial = r.sourceSerial { source = try await device(serial: serial) }
        let dir = "\(workDir)/\(r.name)"
        try mountDisk(target, at: dir, readOnly: false)
        var mounted = true
        defer { if mounted { unmountDisk(dir) } }
        let extraction: Extraction
        do { extraction = Extraction(try TarExtractor(destination: dir)) } catch { throw WireError(.internalError, "\(error)") }
        let watcher = Task {
            for await frame in inbound where frame.kind == .signal { break }
            extraction.cancel()
        }
        defer { watcher.cancel() }
        let entries: Int
        let release: OSRelease
        do {
            if let source {
                // 16 MiB a step, so that the user sees how far it got about once a second.
                try await blocking { try extraction.open(device: source, bytes: r.sourceBytes) }
                var reported = ContinuousClock.now
                while try await blocking({ try extraction.step(limit: 16 << 20) }) < r.sourceBytes {
                    guard ContinuousClock.now - reported >= .seconds(1) else { continue }
                    reported = .now
                    try? await outbound.write(.progress("uvm: extracted \(extraction.fed >> 20) of \(r.sourceBytes >> 20) MiB"))
                }
                entries = try await blocking { try extraction.finish() }
            } else {
                entries = 0
            }
            release = try inspectRootFS(at: dir)
        } catch let e as ArchiveError {
            throw importError(e)
        }
        if let user = r.defaultUser { try DefaultAccount.create(user, root: dir) }
        await blocking { sync() }
        unmountDisk(dir)
        mounted = false
        log("imported distro \(r.name): \(entries) entries, \(release.prettyName ?? "?")")
        return ImportedDistro(prettyName: release.prettyName, entries: entries)
    }

    private static func importError(_ e: ArchiveError) -> WireError {
        WireError(.badRequest, "the import failed: \(e)" + (e.errno == ENOSPC ? " (the disk is full: import again with a larger --size)" : ""))
    }

    /// The distribution's root as a tar written onto uvmd's scratch disk: from the running
    /// instance's root (not crossing into /proc, /dev, shares or other mounts), or from the disk
    /// mounted read-only when the instance is stopped.
    static func exportDistro(_ r: ExportDistroRequest, instances: Instances) async throws -> ExportResult {
        let root = "\(workDir)/\(r.name)-export"
        let target = try await device(serial: r.targetSerial)
        // The disk's file system alone, with the directories that /proc, /sys, /dev and shares
        // cover in the instance as they are on the disk. A running instance has it mounted
        // read-write: a second mount of the same device shares that superblock and must match it
        // (the instance's mounts live in its own namespace, where we cannot bind from).
        let live = await instances.settled(r.name) != nil
        try mountDisk(try await device(serial: r.diskSerial, within: 2), at: root, readOnly: !live)
        defer { unmountDisk(root) }
        let exportRoot = root, limit = r.targetBytes
        do {
            return try await blocking {
                let sink = try BlockSink(device: target, limit: limit)
                defer { sink.close() }
                let tar = TarWriter { chunk in try sink.write(chunk) }
                try tar.addTree(exportRoot, oneFileSystem: true)
                try tar.finish()
                let bytes = try sink.finish()
                return ExportResult(bytes: bytes, skipped: tar.stats.skippedSockets)
            }
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError(.internalError, "export of \(r.name) failed: \(error)")
        }
    }

    /// FITRIM over the distro's file system: a second mount of its disk (sharing the running
    /// instance's superblock, as export does), trimmed and unmounted.
    static func trim(_ r: TrimRequest, instances: Instances) async throws -> TrimResult {
        let name = String(r.serial.dropFirst("uvm-".count))
        let dir = "\(workDir)/\(name)-trim"
        try mountDisk(try await device(serial: r.serial, within: 2), at: dir, readOnly: false)
        defer { unmountDisk(dir) }
        return try await blocking {
            var trimmed: UInt64 = 0
            guard uvm_fitrim(dir, &trimmed) == 0 else {
                throw WireError(.internalError, "FITRIM on \(name): \(String(cString: strerror(errno)))")
            }
            return TrimResult(trimmedBytes: trimmed)
        }
    }

    /// Before uvmd detaches the disk: the instance is stopped, nothing of ours has it mounted.
    static func releaseDisk(_ r: ReleaseDiskRequest, instances: Instances) async {
        await instances.stop(r.name)
        for dir in ["\(workDir)/\(r.name)", "\(workDir)/\(r.name)-export"] { unmountDisk(dir) }
        await blocking { sync() }
    }

    private static func mountDisk(_ device: String, at dir: String, readOnly: Bool) throws {
        mkdir(workDir, 0o700)
        mkdir(dir, 0o755)
        // Not uvm_mount, which takes EBUSY for "mounted already": here it means the disk is
        // mounted elsewhere in the other mode (read-write by an instance), and the folder would
        // be left empty: an export of it was an empty tar that said it had succeeded.
        guard mount(device, dir, "ext4", readOnly ? UInt(MS_RDONLY) : 0, nil) == 0 else {
            let e = errno
            rmdir(dir)
            throw WireError(.internalError, "cannot mount \(device) at \(dir): \(String(cString: strerror(e)))")
        }
    }

    private static func unmountDisk(_ dir: String) {
        if umount2(dir, 0) != 0 && errno == EBUSY { _ = umount2(dir, Int32(MNT_DETACH)) }
        rmdir(dir)
    }

}

/// Blocking calls (file systems, mounts) run on NIO's thread pool, off the cooperative pool.
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await NIOThreadPool.singleton.runIfActive(body)
}

func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    (try? await NIOThreadPool.singleton.runIfActive(body)) ?? body()
}

/// Writes all of `bytes` to `fd`; a failure names `what` was being written.
func writeFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, _ what: String) throws {
    var off = 0
    while off < bytes.count {
        let n = write(fd, bytes.baseAddress! + off, bytes.count - off)
        if n < 0 {
            if errno == EINTR { continue }
            throw WireError(.internalError, "cannot write \(what): \(String(cString: strerror(errno)))")
        }
        off += n
    }
}

/// A spool disk (an import's or export's tar) opened for O_DIRECT (where the device allows it)
/// with a 1 MiB buffer aligned for it: the tar moves once, without filling the guest's page cache.
/// `whose` names it in the messages ("the tar's": "cannot open the tar's disk ...").
private func openDirect(_ device: String, _ flags: Int32, whose: String) throws(SpoolDiskError) -> (fd: Int32, buffer: UnsafeMutableRawPointer) {
    var fd = open(device, flags | O_CLOEXEC | uvm_o_direct())
    if fd < 0 && errno == EINVAL { fd = open(device, flags | O_CLOEXEC) }
    guard fd >= 0 else { throw SpoolDiskError(message: "cannot open \(whose) disk \(device): \(String(cString: strerror(errno)))") }
    var p: UnsafeMutableRawPointer?
    guard posix_memalign(&p, 4096, spoolBlock) == 0, let p else {
        close(fd)
        throw SpoolDiskError(message: "out of memory for \(whose) buffer")
    }
    return (fd, p)
}

private struct SpoolDiskError: Error {
    let message: String
}

private let spoolBlock = 1 << 20

/// Sequential writes to a block device in whole aligned 1 MiB blocks, at most `limit` bytes.
private final class BlockSink {
    private let fd: Int32
    private let device: String
    private let limit: UInt64
    private let block = spoolBlock
    private let buffer: UnsafeMutableRawPointer
    private var filled = 0
    private(set) var total: UInt64 = 0

    init(device: String, limit: UInt64) throws {
        do {
            (fd, buffer) = try openDirect(device, O_WRONLY, whose: "the export's")
        } catch {
            throw WireError(.internalError, error.message)
        }
        self.device = device
        self.limit = limit
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard total + UInt64(bytes.count) <= limit else {
            throw WireError(.internalError, "the tar is larger than the \(limit) bytes the export's disk holds")
        }
        var off = 0
        while off < bytes.count {
            let n = min(block - filled, bytes.count - off)
            (buffer + filled).copyMemory(from: bytes.baseAddress! + off, byteCount: n)
            filled += n
            off += n
            if filled == block { try flush(block) }
        }
        total += UInt64(bytes.count)
    }

    /// The last partial block, padded with zeros to whole sectors; returns the tar's length.
    func finish() throws -> UInt64 {
        if filled > 0 {
            let padded = (filled + 511) / 512 * 512
            (buffer + filled).initializeMemory(as: UInt8.self, repeating: 0, count: padded - filled)
            try flush(padded)
        }
        guard fsync(fd) == 0 else { throw WireError(.internalError, "flushing the export's disk \(device): \(String(cString: strerror(errno)))") }
        return total
    }

    private func flush(_ count: Int) throws {
        var off = 0
        while off < count {
            let n = Glibc.write(fd, buffer + off, count - off)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw WireError(.internalError, "writing the export's disk \(device): \(String(cString: strerror(errno)))") }
            off += n
        }
        filled = 0
    }

    func close() {
        Glibc.close(fd)
        free(buffer)
    }
}

/// The extraction of a tar read from a disk, one step at a time on the thread pool (each step
/// awaits the previous one); `cancel` may come from another thread.
private final class Extraction: @unchecked Sendable {
    private let extractor: TarExtractor
    private let cancelled = Atomic<Bool>(false)
    init(_ e: TarExtractor) { extractor = e }

    func cancel() { cancelled.store(true, ordering: .relaxed) }

    private var fd: Int32 = -1
    private var buffer: UnsafeMutableRawPointer?
    private var device = ""
    private var bytes: UInt64 = 0
    /// How much of the tar the extractor has had.
    private(set) var fed: UInt64 = 0
    private let chunk = spoolBlock

    /// The tar is the first `bytes` bytes of `device`; the guest's page cache keeps the files it
    /// writes rather than the tar.
    func open(device: String, bytes: UInt64) throws {
        do {
            (fd, buffer) = try openDirect(device, O_RDONLY, whose: "the tar's")
        } catch {
            throw ArchiveError(error.message)
        }
        self.device = device
        self.bytes = bytes
    }

    /// Feeds at most `limit` more bytes to the extractor; returns how many it has had in all.
    func step(limit: UInt64) throws -> UInt64 {
        guard let buffer else { throw ArchiveError("the tar's disk is not open") }
        let stop = min(bytes, fed + limit)
        while fed < stop {
            if cancelled.load(ordering: .relaxed) { throw ArchiveError("import cancelled") }
            let want = Int(min(UInt64(chunk), bytes - fed))
            let n = read(fd, buffer, want)
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw ArchiveError("reading the tar's disk \(device) at byte \(fed): \(String(cString: strerror(errno)))") }
            if n == 0 { throw ArchiveError("the tar's disk \(device) ended at byte \(fed) of \(bytes)") }
            try extractor.feed(UnsafeRawBufferPointer(start: buffer, count: n))
            fed += UInt64(n)
        }
        return fed
    }

    func finish() throws -> Int { try extractor.finish().entries }

    deinit {
        if fd >= 0 { Glibc.close(fd) }
        free(buffer)
    }

}

/// The account `uvm` and `uvm shell` land in: the host user's name, uid and gid, bash when the
/// distribution has it, password-less sudo, and `[user] default` in /etc/uvm.conf (WSL's key).
enum DefaultAccount {
    static func create(_ user: DefaultUser, root: String) throws {
        // Root on the host stays root inside: no second account for uid 0.
        guard user.uid != 0 else { return }
        guard isPlainName(user.name) else { throw WireError(.badRequest, "cannot create user '\(user.name)': not a valid user name") }
        let passwd = readSmallFile("\(root)/etc/passwd") ?? ""
        let existing = passwd.split(separator: "\n").map { $0.split(separator: ":", omittingEmptySubsequences: false) }
        if let same = existing.first(where: { $0.count >= 3 && ($0[0] == user.name || $0[2] == "\(user.uid)") }) {
            // The root file system has the user already: make it the default, create nothing.
            try setDefault(String(same[0]), root: root)
            return
        }
        let shell = access("\(root)/bin/bash", X_OK) == 0 || faccessat(AT_FDCWD, "\(root)/usr/bin/bash", X_OK, AT_SYMLINK_NOFOLLOW) == 0 ? "/bin/bash" : "/bin/sh"
        let home = "/home/\(user.name)"
        let groupText = readSmallFile("\(root)/etc/group") ?? ""
        var groupLines = groupText.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if groupLines.last == "" { groupLines.removeLast() }
        if !groupLines.contains(where: { $0.split(separator: ":", omittingEmptySubsequences: false).dropFirst(2).first == Substring("\(user.gid)") }) {
            groupLines.append("\(user.name):x:\(user.gid):")
        }
        // Administrators: `sudo` on Debian and Ubuntu, `wheel` elsewhere; and Docker's socket
        // group where Docker is installed (as Docker Desktop's WSL integration does).
        for admins in [["sudo", "wheel"], ["docker"]] {
            for admin in admins {
                if let i = groupLines.firstIndex(where: { $0.hasPrefix("\(admin):") }) {
                    groupLines[i] += groupLines[i].hasSuffix(":") ? user.name : ",\(user.name)"
                    break
                }
            }
        }
        try append("\(root)/etc/passwd", "\(user.name):x:\(user.uid):\(user.gid)::\(home):\(shell)\n")
        try replace("\(root)/etc/group", groupLines.joined(separator: "\n") + "\n")
        if access("\(root)/etc/shadow", F_OK) == 0 {
            // No password (`*`): sudo is password-less, and logins come through uvm.
            try append("\(root)/etc/shadow", "\(user.name):*:19000:0:99999:7:::\n")
        }
        if access("\(root)/etc/gshadow", F_OK) == 0 {
            try append("\(root)/etc/gshadow", "\(user.name):!::\n")
        }
        mkdir("\(root)/home", 0o755)
        mkdir("\(root)\(home)", 0o750)
        // A home set up as the distribution's skeleton would.
        copySkeleton(from: "\(root)/etc/skel", to: "\(root)\(home)", uid: user.uid, gid: user.gid)
        _ = lchown("\(root)\(home)", user.uid, user.gid)
        if access("\(root)/etc/sudoers.d", F_OK) == 0 {
            let path = "\(root)/etc/sudoers.d/uvm-\(user.name)"
            try replace(path, "\(user.name) ALL=(ALL:ALL) NOPASSWD: ALL\n", mode: 0o440)
        }
        // Rootless containers (Podman, rootless Docker) map the user's containers to a range of
        // ids of its own, as useradd gives one where the distribution has the files.
        for file in ["subuid", "subgid"] {
            let path = "\(root)/etc/\(file)"
            guard let text = readSmallFile(path) else { continue }
            if !text.split(separator: "\n").contains(where: { $0.hasPrefix("\(user.name):") }) {
                try append(path, "\(user.name):100000:65536\n")
            }
        }
        // With systemd, the user's own manager (`systemctl --user`, /run/user/UID, its D-Bus)
        // runs from the instance's start: lingering, as `loginctl enable-linger` sets it.
        if faccessat(AT_FDCWD, "\(root)/lib/systemd/systemd", X_OK, 0) == 0 {
            for dir in ["/var/lib/systemd", "/var/lib/systemd/linger"] { mkdir("\(root)\(dir)", 0o755) }
            try replace("\(root)/var/lib/systemd/linger/\(user.name)", "")
        }
        try setDefault(user.name, root: root)
    }

    static func setDefault(_ name: String, root: String) throws {
        let path = "\(root)/etc/uvm.conf"
        let current = readSmallFile(path) ?? ""
        if DistroConfig.parse(current).values["user.default"] != nil { return }  // the image decided
        try append(path, (current.isEmpty || current.hasSuffix("\n") ? "" : "\n") + "[user]\ndefault = \(name)\n")
    }

    private static func isPlainName(_ s: String) -> Bool {
        !s.isEmpty && s.count <= 32 && s.first != "-" && s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
    }

    private static func copySkeleton(from skel: String, to home: String, uid: uid_t, gid: gid_t) {
        guard let dir = opendir(skel) else { return }
        defer { closedir(dir) }
        while let e = readdir(dir) {
            let name = direntName(e)
            guard name != ".", name != "..", e.pointee.d_type == UInt8(DT_REG) else { continue }
            guard let text = readSmallFile("\(skel)/\(name)") else { continue }
            try? replace("\(home)/\(name)", text, mode: 0o644)
            _ = lchown("\(home)/\(name)", uid, gid)
        }
    }

    private static func append(_ path: String, _ text: String) throws {
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw WireError(.internalError, "cannot write \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        try writeText(fd, text, path)
    }

    private static func replace(_ path: String, _ text: String, mode: mode_t = 0o644) throws {
        var st = stat()
        let keep = lstat(path, &st) == 0 ? st.st_mode & 0o7777 : mode
        let tmp = path + ".uvm-new"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, keep)
        guard fd >= 0 else { throw WireError(.internalError, "cannot write \(tmp): \(String(cString: strerror(errno)))") }
        do {
            try writeText(fd, text, path)
            fchmod(fd, keep)
            close(fd)
        } catch {
            close(fd)
            unlink(tmp)
            throw error
        }
        guard rename(tmp, path) == 0 else { throw WireError(.internalError, "cannot replace \(path): \(String(cString: strerror(errno)))") }
    }

    private static func writeText(_ fd: Int32, _ text: String, _ path: String) throws {
        try Array(text.utf8).withUnsafeBytes { try writeFully(fd, $0, path) }
    }
}
