import CSyscalls
import Glibc

/// Counts from one archive run, for the caller to report.
public struct TarWriterStats: Sendable, Equatable {
    public var entries = 0
    public var hardLinks = 0
    public var sparseFiles = 0
    /// Sockets cannot be archived (they are recreated by whatever listens on them).
    public var skippedSockets = 0
    /// Paths the caller excluded that were present.
    public var excluded = 0
    /// Files that shrank while being read: the archive holds zeros for the missing end.
    public var shrunkFiles = 0
    public var bytesWritten: UInt64 = 0
}

/// Writes a POSIX pax tar of a directory tree through a sink, in buffers of bounded size.
///
/// Everything a root file system needs round-trips: numeric owners, full modes, mtimes with
/// nanoseconds, devices, fifos, hard links, symlinks, xattrs of every namespace (as
/// SCHILY.xattr.*), sparse files (GNU sparse 1.0, as GNU tar writes them), and names of any bytes.
public final class TarWriter {
    public typealias Sink = (UnsafeRawBufferPointer) throws -> Void

    private let sink: Sink
    private let buffer: UnsafeMutableRawBufferPointer
    private var used = 0
    private var links: [LinkKey: [UInt8]] = [:]
    private var finished = false
    private var viaProc = true
    public private(set) var stats = TarWriterStats()

    private struct LinkKey: Hashable { var dev: UInt64, ino: UInt64 }

    /// `sink` receives the archive in pieces of at most `bufferSize` bytes; the bytes are only
    /// valid during the call.
    public init(bufferSize: Int = 1 << 20, sink: @escaping Sink) {
        precondition(bufferSize >= Tar.block && bufferSize % Tar.block == 0, "buffer must be whole blocks")
        self.sink = sink
        buffer = .allocate(byteCount: bufferSize, alignment: 4096)
    }

    deinit { buffer.deallocate() }

    /// Archives the tree at `root`, entries named relative to it ("./" is the root itself).
    /// `excluding`: relative paths ("proc", "var/cache/x") left out entirely. With
    /// `oneFileSystem`, a directory on another file system (a mount point) is archived as an
    /// empty directory and not entered.
    public func addTree(_ root: String, excluding: [String] = [], oneFileSystem: Bool = true) throws {
        let excluded = Set(excluding.map { p -> [UInt8] in
            Array(p.utf8.split(separator: 0x2F, omittingEmptySubsequences: true).filter { $0 != [0x2E] }
                .joined(separator: [0x2F]))
        })
        let rootPath = Array(root.utf8)
        let fd = try check("open \(root)") { uvm_ar_openat(AT_FDCWD, root, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_CLOEXEC, 0) }
        defer { close(fd) }
        var st = stat()
        try check("stat \(root)") { fstat(fd, &st) }
        // Xattrs are read through /proc/self/fd/DIR/NAME, so a directory swapped for a symlink
        // while we walk cannot send us elsewhere; without /proc, through the full path.
        viaProc = access("/proc/self/fd", F_OK) == 0
        try emit(dirfd: fd, name: nil, path: [], full: rootPath, st: st)
        try walk(dirfd: fd, rel: [], rootPath: rootPath, rootDev: UInt64(st.st_dev), oneFileSystem: oneFileSystem, excluded: excluded)
    }

    /// `uvm cp`: what `fd` refers to (opened O_RDONLY, so a final symlink was followed), as
    /// `entryName`; a directory with everything beneath it when `recursive` (crossing mounts, as
    /// cp -r does), refused without it.
    public func add(opened fd: Int32, as entryName: [UInt8], recursive: Bool) throws {
        // Walking below the root reads xattrs through /proc/self/fd only (no root path here).
        guard access("/proc/self/fd", F_OK) == 0 else { throw ArchiveError("copying needs /proc mounted") }
        viaProc = true
        var st = stat()
        try check("stat \(display(entryName))") { fstat(fd, &st) }
        let isDirectory = st.st_mode & S_IFMT == S_IFDIR
        if isDirectory && !recursive { throw ArchiveError("'\(display(entryName))' is a directory: copy it with -r") }
        do {
            try emit(dirfd: fd, name: nil, path: entryName, full: [], st: st)
        } catch var e as ArchiveError where e.entry == nil {
            e.entry = display(entryName)
            throw e
        }
        if isDirectory {
            try walk(dirfd: fd, rel: entryName, rootPath: entryName, rootDev: UInt64(st.st_dev), oneFileSystem: false, excluded: [])
        }
    }

    /// The same for `name` in the directory `dirfd`, where a symlink is archived as the link.
    public func add(in dirfd: Int32, name: [UInt8], as entryName: [UInt8], recursive: Bool) throws {
        var st = stat()
        _ = try withCString(name) { n in try check("stat \(display(entryName))") { fstatat(dirfd, n, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) } }
        let fmt = st.st_mode & S_IFMT
        if fmt != S_IFREG && fmt != S_IFDIR {
            // Symlinks as the link; devices and fifos as nodes, never opened (a fifo would block).
            viaProc = true
            try emit(dirfd: dirfd, name: name, path: entryName, full: Array("/proc/self/fd/\(dirfd)/".utf8) + name, st: st)
            return
        }
        let fd = try withCString(name) { n in
            try check("open \(display(entryName))") { uvm_ar_openat(dirfd, n, O_RDONLY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0) }
        }
        defer { close(fd) }
        try add(opened: fd, as: entryName, recursive: recursive)
    }

    /// Ends the archive (two zero blocks) and hands the rest of the buffer to the sink.
    public func finish() throws {
        guard !finished else { return }
        finished = true
        try appendZeros(2 * Tar.block)
        try flush()
    }

    // MARK: walking

    private func walk(dirfd: Int32, rel: [UInt8], rootPath: [UInt8], rootDev: UInt64, oneFileSystem: Bool,
                      excluded: Set<[UInt8]>) throws {
        for name in try listDirectory(dirfd, rel: rel) {
            var path = rel
            if !path.isEmpty { path.append(0x2F) }
            path += name
            if excluded.contains(path) {
                stats.excluded += 1
                continue
            }
            var st = stat()
            let r = withCString(name) { fstatat(dirfd, $0, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) }
            if r != 0 {
                if errno == ENOENT { continue }  // removed since the listing
                throw ArchiveError.sys("stat \(display(path))")
            }
            let full = viaProc ? Array("/proc/self/fd/\(dirfd)/".utf8) + name : rootPath + [0x2F] + path
            do {
                try emit(dirfd: dirfd, name: name, path: path, full: full, st: st)
            } catch var e as ArchiveError where e.entry == nil {
                e.entry = display(path)
                throw e
            }
            guard st.st_mode & S_IFMT == S_IFDIR, !oneFileSystem || UInt64(st.st_dev) == rootDev else { continue }
            let child = try withCString(name) { cname in
                try check("open \(display(path))") {
                    uvm_ar_openat(dirfd, cname, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0)
                }
            }
            defer { close(child) }
            try walk(dirfd: child, rel: path, rootPath: rootPath, rootDev: rootDev, oneFileSystem: oneFileSystem, excluded: excluded)
        }
    }

    /// The names in a directory, sorted bytewise so archives of equal trees are equal.
    private func listDirectory(_ dirfd: Int32, rel: [UInt8]) throws -> [[UInt8]] {
        let fd = try check("dup") { dup(dirfd) }
        guard let dir = fdopendir(fd) else {
            close(fd)
            throw ArchiveError.sys("opendir \(display(rel))")
        }
        defer { closedir(dir) }
        var names: [[UInt8]] = []
        while true {
            guard let p = uvm_ar_readdir_name(UnsafeMutableRawPointer(dir)) else {
                if errno != 0 { throw ArchiveError.sys("readdir \(display(rel))") }
                break
            }
            let name = Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
            if name == [0x2E] || name == [0x2E, 0x2E] { continue }
            names.append(name)
        }
        return names.sorted { $0.lexicographicallyPrecedes($1) }
    }

    // MARK: entries

    private func emit(dirfd: Int32, name: [UInt8]?, path: [UInt8], full: [UInt8], st: stat) throws {
        let fmt = st.st_mode & S_IFMT
        if fmt == S_IFSOCK {
            stats.skippedSockets += 1
            return
        }
        var e = Entry(path: path, type: Tar.TypeFlag.regular, mode: UInt32(st.st_mode & 0o7777),
                      uid: st.st_uid, gid: st.st_gid, mtime: (Int64(st.st_mtim.tv_sec), Int64(st.st_mtim.tv_nsec)))
        if fmt != S_IFDIR, st.st_nlink > 1 {
            let key = LinkKey(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino))
            if let first = links[key] {
                e.type = Tar.TypeFlag.hardLink
                e.linkpath = first
                stats.hardLinks += 1
                try writeHeader(e)
                return
            }
            links[key] = path
        }
        e.xattrs = try (name == nil ? readXattrs(fd: dirfd, path: nil) : readXattrs(fd: nil, path: full)).sorted { $0.name.lexicographicallyPrecedes($1.name) }
        switch fmt {
        case S_IFDIR:
            e.type = Tar.TypeFlag.directory
            e.path = path.isEmpty ? [0x2E, 0x2F] : path + [0x2F]
            try writeHeader(e)
        case S_IFLNK:
            e.type = Tar.TypeFlag.symlink
            e.linkpath = try readLink(dirfd: dirfd, name: name ?? [0x2E], size: Int(st.st_size), path: path)
            try writeHeader(e)
        case S_IFCHR, S_IFBLK:
            e.type = fmt == S_IFCHR ? Tar.TypeFlag.char : Tar.TypeFlag.block
            e.devmajor = uvm_ar_major(UInt64(st.st_rdev))
            e.devminor = uvm_ar_minor(UInt64(st.st_rdev))
            try writeHeader(e)
        case S_IFIFO:
            e.type = Tar.TypeFlag.fifo
            try writeHeader(e)
        case S_IFREG:
            if let name {
                try emitFile(dirfd: dirfd, name: name, entry: e, st: st)
            } else {
                try emitFile(fd: dirfd, entry: e, st: st)  // the root of a copy: `dirfd` is the file
            }
        default:
            return
        }
    }

    private func readLink(dirfd: Int32, name: [UInt8], size: Int, path: [UInt8]) throws -> [UInt8] {
        var cap = max(size + 1, 256)
        while true {
            var buf = [UInt8](repeating: 0, count: cap)
            let n = try withCString(name) { cname in
                try check("readlink \(display(path))") { buf.withUnsafeMutableBytes { readlinkat(dirfd, cname, $0.baseAddress!.assumingMemoryBound(to: CChar.self), cap) } }
            }
            if n < cap { return Array(buf[..<n]) }
            cap *= 2  // the link changed size since lstat
        }
    }

    private func emitFile(dirfd: Int32, name: [UInt8], entry: Entry, st: stat) throws {
        let fd = try withCString(name) { cname in
            try check("open \(display(entry.path))") { uvm_ar_openat(dirfd, cname, O_RDONLY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0) }
        }
        defer { close(fd) }
        try emitFile(fd: fd, entry: entry, st: st)
    }

    private func emitFile(fd: Int32, entry: Entry, st: stat) throws {
        var e = entry
        let size = UInt64(st.st_size)
        if let extents = try dataExtents(fd: fd, size: size, blocks: UInt64(st.st_blocks)) {
            var map = Array("\(extents.count)\n".utf8)
            for x in extents { map += Array("\(x.offset)\n\(x.length)\n".utf8) }
            map += [UInt8](repeating: 0, count: Tar.padding(UInt64(map.count)))
            e.size = UInt64(map.count) + extents.reduce(0) { $0 + $1.length }
            e.sparseRealSize = size
            stats.sparseFiles += 1
            try writeHeader(e)
            try map.withUnsafeBytes { try append($0) }
            for x in extents { try copyData(fd: fd, offset: x.offset, length: x.length) }
        } else {
            e.size = size
            try writeHeader(e)
            try copyData(fd: fd, offset: 0, length: size)
        }
        try appendZeros(Tar.padding(e.size))
    }

    /// Where a file holds data, from SEEK_DATA/SEEK_HOLE; nil when it is not sparse (or the file
    /// system cannot say). Ends with a zero-length extent at the size when the file ends in a
    /// hole, as GNU tar writes it.
    private func dataExtents(fd: Int32, size: UInt64, blocks: UInt64) throws -> [(offset: UInt64, length: UInt64)]? {
        guard size > 0, blocks * 512 < size else { return nil }
        var extents: [(offset: UInt64, length: UInt64)] = []
        var pos: Int64 = 0
        while UInt64(pos) < size {
            let d = lseek(fd, off_t(pos), uvm_ar_SEEK_DATA)
            if d < 0 {
                if errno == ENXIO { break }  // only a hole is left
                if errno == EINVAL { return nil }
                throw ArchiveError.sys("seek data")
            }
            if UInt64(d) >= size { break }
            let h = try check("seek hole") { lseek(fd, d, uvm_ar_SEEK_HOLE) }
            let end = min(UInt64(h), size)
            extents.append((UInt64(d), end - UInt64(d)))
            pos = Int64(end)
        }
        if extents.count == 1, extents[0].offset == 0, extents[0].length == size { return nil }
        if (extents.last.map { $0.offset + $0.length } ?? 0) < size { extents.append((size, 0)) }
        return extents
    }

    // MARK: headers

    struct Entry {
        var path: [UInt8]
        var type: UInt8
        var mode: UInt32
        var uid: UInt32
        var gid: UInt32
        var mtime: (sec: Int64, nsec: Int64)
        var size: UInt64 = 0
        var linkpath: [UInt8] = []
        var devmajor: UInt32 = 0
        var devminor: UInt32 = 0
        var xattrs: [(name: [UInt8], value: [UInt8])] = []
        var sparseRealSize: UInt64?
    }

    private func writeHeader(_ e: Entry) throws {
        var pax: [UInt8] = []
        var h = [UInt8](repeating: 0, count: Tar.block)
        let binary = !isUTF8(e.path) || !isUTF8(e.linkpath) || e.xattrs.contains { !isUTF8($0.name) }
        if binary { pax += Tar.paxRecord("hdrcharset", "BINARY") }
        if let realSize = e.sparseRealSize {
            // GNU sparse 1.0: the real name and size are in pax; the ustar name is a stand-in so
            // that readers without sparse support do not write the packed data under the name.
            pax += Tar.paxRecord("GNU.sparse.major", "1") + Tar.paxRecord("GNU.sparse.minor", "0")
            pax += Tar.paxRecord(Array("GNU.sparse.name".utf8), e.path)
            pax += Tar.paxRecord("GNU.sparse.realsize", String(realSize))
            Tar.putString(&h, Tar.name, Array("GNUSparseFile.0/".utf8) + basename(e.path).prefix(84))
        } else if !putUstarName(&h, e.path) {
            pax += Tar.paxRecord(Array("path".utf8), e.path)
            Tar.putString(&h, Tar.name, e.path.prefix(100))
        }
        if e.linkpath.count > 100 || !isASCII(e.linkpath) { pax += Tar.paxRecord(Array("linkpath".utf8), e.linkpath) }
        Tar.putString(&h, Tar.linkname, e.linkpath.prefix(100))
        let max11: UInt64 = 1 << 33, max7: UInt64 = 1 << 21
        if e.mtime.nsec != 0 || e.mtime.sec < 0 || UInt64(e.mtime.sec) >= max11 {
            pax += Tar.paxRecord("mtime", Tar.formatTime(sec: e.mtime.sec, nsec: e.mtime.nsec))
        }
        if UInt64(e.uid) >= max7 { pax += Tar.paxRecord("uid", String(e.uid)) }
        if UInt64(e.gid) >= max7 { pax += Tar.paxRecord("gid", String(e.gid)) }
        if e.size >= max11 { pax += Tar.paxRecord("size", String(e.size)) }
        for x in e.xattrs { pax += Tar.paxRecord(Array("SCHILY.xattr.".utf8) + x.name, x.value) }

        Tar.putNumber(&h, Tar.mode, UInt64(e.mode))
        Tar.putNumber(&h, Tar.uid, UInt64(e.uid))
        Tar.putNumber(&h, Tar.gid, UInt64(e.gid))
        Tar.putNumber(&h, Tar.size, e.size)
        Tar.putNumber(&h, Tar.mtime, UInt64(max(e.mtime.sec, 0)))
        h[Tar.typeflag] = e.type
        Tar.putString(&h, Tar.magic, Array("ustar\0".utf8))
        Tar.putString(&h, Tar.version, Array("00".utf8))
        Tar.putNumber(&h, Tar.devmajor, UInt64(e.devmajor))
        Tar.putNumber(&h, Tar.devminor, UInt64(e.devminor))
        Tar.sealChecksum(&h)

        if !pax.isEmpty {
            var x = [UInt8](repeating: 0, count: Tar.block)
            Tar.putString(&x, Tar.name, Array("PaxHeaders/".utf8) + basename(e.path).prefix(89))
            Tar.putNumber(&x, Tar.mode, 0o644)
            Tar.putNumber(&x, Tar.size, UInt64(pax.count))
            Tar.putNumber(&x, Tar.mtime, UInt64(max(e.mtime.sec, 0)))
            x[Tar.typeflag] = Tar.TypeFlag.paxLocal
            Tar.putString(&x, Tar.magic, Array("ustar\0".utf8))
            Tar.putString(&x, Tar.version, Array("00".utf8))
            Tar.sealChecksum(&x)
            try x.withUnsafeBytes { try append($0) }
            try pax.withUnsafeBytes { try append($0) }
            try appendZeros(Tar.padding(UInt64(pax.count)))
        }
        try h.withUnsafeBytes { try append($0) }
        stats.entries += 1
    }

    /// Puts an ASCII path in name (and prefix, split at a '/'); false when it needs pax.
    private func putUstarName(_ h: inout [UInt8], _ path: [UInt8]) -> Bool {
        guard isASCII(path) else { return false }
        if path.count <= 100 {
            Tar.putString(&h, Tar.name, path)
            return true
        }
        guard path.count <= 256 else { return false }
        // The prefix must be at most 155 bytes and the rest at most 100 (a directory's trailing '/' included).
        for i in stride(from: min(155, path.count - 2), through: 1, by: -1) where path[i] == 0x2F {
            guard path.count - i - 1 <= 100 else { return false }
            Tar.putString(&h, Tar.prefix, path[..<i])
            Tar.putString(&h, Tar.name, path[(i + 1)...])
            return true
        }
        return false
    }

    private func basename(_ path: [UInt8]) -> ArraySlice<UInt8> {
        var p = path[...]
        while p.last == 0x2F { p = p.dropLast() }
        if let slash = p.lastIndex(of: 0x2F) { p = p[(slash + 1)...] }
        return p.isEmpty ? [0x2E][...] : p
    }

    private func isASCII(_ b: [UInt8]) -> Bool { b.allSatisfy { $0 < 0x80 } }
    private func isUTF8(_ b: [UInt8]) -> Bool { String(validating: b, as: UTF8.self) != nil }

    // MARK: buffering

    private func append(_ p: UnsafeRawBufferPointer) throws {
        var off = 0
        while off < p.count {
            let n = min(buffer.count - used, p.count - off)
            (buffer.baseAddress! + used).copyMemory(from: p.baseAddress! + off, byteCount: n)
            used += n
            off += n
            if used == buffer.count { try flush() }
        }
    }

    private func appendZeros(_ count: Int) throws {
        var left = count
        while left > 0 {
            let n = min(buffer.count - used, left)
            (buffer.baseAddress! + used).initializeMemory(as: UInt8.self, repeating: 0, count: n)
            used += n
            left -= n
            if used == buffer.count { try flush() }
        }
    }

    /// Reads file data straight into the buffer. A file that shrank under us is padded with
    /// zeros: the header already promised its size.
    private func copyData(fd: Int32, offset: UInt64, length: UInt64) throws {
        var remaining = length
        var off = offset
        while remaining > 0 {
            if used == buffer.count { try flush() }
            let want = Int(min(UInt64(buffer.count - used), remaining))
            let n = pread(fd, buffer.baseAddress! + used, want, off_t(off))
            if n < 0 {
                if errno == EINTR { continue }
                throw ArchiveError.sys("read")
            }
            if n == 0 {
                stats.shrunkFiles += 1
                while remaining > 0 {
                    let z = Int(min(remaining, UInt64(1 << 30)))
                    try appendZeros(z)
                    remaining -= UInt64(z)
                }
                return
            }
            used += n
            remaining -= UInt64(n)
            off += UInt64(n)
        }
        if used == buffer.count { try flush() }
    }

    private func flush() throws {
        guard used > 0 else { return }
        try sink(UnsafeRawBufferPointer(start: buffer.baseAddress, count: used))
        stats.bytesWritten += UInt64(used)
        used = 0
    }
}
