import CSyscalls
import Glibc

public struct ExtractOptions: Sendable {
    /// chown entries to the archive's uid/gid (needs root). Without it, privileged xattrs that
    /// cannot be set are counted in `ExtractStats.ignoredXattrs` instead of failing.
    public var preserveOwnership: Bool = geteuid() == 0
    /// Largest pax extended header (x/g) and GNU long name (L/K) accepted: they are held in memory.
    public var maxHeaderDataSize = 1 << 20
    public var maxXattrsPerEntry = 1024
    /// Sparse map entries per file (16 bytes of memory each).
    public var maxSparseExtents = 1 << 20
    /// Larger stored or real sizes are taken for corruption (ext4's limit is 16 TiB).
    public var maxFileSize: UInt64 = 1 << 46
    /// `uvm cp`: the top-level names the archive may hold, each mapped to the name it lands
    /// under (a single source takes the destination's name). Any other entry is refused, so an
    /// archive from the other side cannot write beside what was asked for. nil: any name, as is.
    public var topLevelNames: [[UInt8]: [UInt8]]?
    /// Every entry gets this owner instead of the archive's (`uvm cp` into a distro: its user).
    public var owner: Owner?
    /// Mode bits cleared on every entry (setuid/setgid when owners are not kept, as cp does).
    public var clearedModeBits: UInt32 = 0

    public struct Owner: Sendable, Equatable {
        public var uid: UInt32
        public var gid: UInt32
        public init(uid: UInt32, gid: UInt32) { (self.uid, self.gid) = (uid, gid) }
    }

    public init() {}
}

public struct ExtractStats: Sendable, Equatable {
    public var entries = 0
    public var files = 0
    public var directories = 0
    public var symlinks = 0
    public var hardLinks = 0
    public var devices = 0
    public var fifos = 0
    /// Volume labels and other entries that have nothing to create.
    public var skipped = 0
    public var ignoredXattrs = 0
    /// ACLs in text form that name users or groups only by name (they need numeric ids).
    public var ignoredACLs = 0
}

/// Extracts a tar archive pushed at it in pieces of any size: `feed` as bytes arrive, then
/// `finish`. Memory stays bounded (file data goes straight to disk; only headers are held).
///
/// Reads ustar, pax (x and g), GNU long names (L/K), GNU sparse (old 'S', pax 0.0, 0.1 and 1.0).
/// Every entry lands beneath the destination (see `Destination`): leading '/' is dropped, '..'
/// is refused, symlinks the archive made are never followed. Errors name the entry and the byte
/// offset of its header; after one, the extractor refuses further input.
public final class TarExtractor {
    private let options: ExtractOptions
    private let dest: Destination
    public private(set) var stats = ExtractStats()
    /// Bytes consumed so far.
    public private(set) var offset: UInt64 = 0

    private enum State { case header, sparseExtension, meta, skip, sparseMap, mapPadding, data, end, failed }
    private enum MetaKind { case pax, global, longName, longLink }

    private var state = State.header
    private var failure: ArchiveError?
    private var block = [UInt8](repeating: 0, count: Tar.block)
    private var blockFill = 0
    private var headerOffset: UInt64 = 0
    private var zeroBlocks = 0
    private var metaKind = MetaKind.pax
    private var metaData: [UInt8] = []
    private var remaining: UInt64 = 0  // of meta, skip or data
    private var pending: Pending?
    private var output: FileOutput?
    private var mapParser = SparseMapParser()

    // Headers that apply to the next entry (x, L, K) and to all later ones (g).
    private var local = PaxFields()
    private var global = PaxFields()
    private var longName: [UInt8]?
    private var longLink: [UInt8]?
    private var currentName: [UInt8]?

    public init(destination: String, options: ExtractOptions = ExtractOptions()) throws {
        self.options = options
        dest = try Destination(path: destination, preserveOwnership: options.preserveOwnership || options.owner != nil)
    }

    /// Into the directory open at `destinationFD` (resolved by the caller, say within a distro's
    /// root); the extractor owns the descriptor from here on.
    public init(destinationFD: Int32, options: ExtractOptions = ExtractOptions()) {
        self.options = options
        dest = Destination(rootFD: destinationFD, preserveOwnership: options.preserveOwnership || options.owner != nil)
    }

    deinit {
        if let output { close(output.fd) }
    }

    public func feed(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try feed($0) }
    }

    public func feed(_ bytes: UnsafeRawBufferPointer) throws {
        if let failure { throw failure }
        guard var p = bytes.baseAddress else { return }
        var n = bytes.count
        do {
            while n > 0 {
                let k = try step(p, n)
                p += k
                n -= k
                offset += UInt64(k)
            }
        } catch let e as ArchiveError {
            throw fail(e)
        }
    }

    /// Checks the archive ended properly, then gives directories their metadata.
    @discardableResult
    public func finish() throws -> ExtractStats {
        if let failure { throw failure }
        let complete = state == .end
            || (state == .header && blockFill == 0 && zeroBlocks > 0 && longName == nil && longLink == nil && local.isEmpty)
        guard complete else {
            throw fail(ArchiveError("truncated archive: it ends at byte \(offset) " + (state == .header && blockFill == 0 ? "without the end-of-archive blocks" : "inside an entry")))
        }
        currentName = nil  // errors from here name the directory in their message
        do {
            try dest.finishDirectories()
        } catch let e as ArchiveError {
            throw fail(e)
        }
        stats.ignoredXattrs = dest.ignoredXattrs
        state = .end
        return stats
    }

    private func fail(_ e: ArchiveError) -> ArchiveError {
        var e = e
        if e.entry == nil, let currentName { e.entry = display(currentName) }
        if e.offset == nil { e.offset = headerOffset }
        failure = e
        state = .failed
        if let output {
            close(output.fd)
            self.output = nil
        }
        return e
    }

    // MARK: the state machine

    private func step(_ p: UnsafeRawPointer, _ n: Int) throws -> Int {
        switch state {
        case .header, .sparseExtension:
            if blockFill == 0 { headerOffset = offset }
            let k = min(Tar.block - blockFill, n)
            block.withUnsafeMutableBytes { ($0.baseAddress! + blockFill).copyMemory(from: p, byteCount: k) }
            blockFill += k
            if blockFill == Tar.block {
                blockFill = 0
                if state == .header { try header() } else { try sparseExtension() }
            }
            return k
        case .meta:
            let k = Int(min(UInt64(n), remaining))
            metaData.append(contentsOf: UnsafeRawBufferPointer(start: p, count: k))
            remaining -= UInt64(k)
            if remaining == 0 { try metaDone() }
            return k
        case .skip:
            let k = Int(min(UInt64(n), remaining))
            remaining -= UInt64(k)
            if remaining == 0 { state = .header }
            return k
        case .sparseMap:
            var k = 0
            while k < n, state == .sparseMap {
                try sparseMapByte(p.load(fromByteOffset: k, as: UInt8.self))
                k += 1
            }
            return k
        case .mapPadding:
            let k = Int(min(UInt64(n), remaining))
            remaining -= UInt64(k)
            if remaining == 0 { try beginData() }
            return k
        case .data:
            let k = Int(min(UInt64(n), remaining))
            try output!.write(p, k)
            remaining -= UInt64(k)
            if remaining == 0 { try fileDone() }
            return k
        case .end:
            return n  // anything after the end marker (more zero blocks, usually) is ignored
        case .failed:
            throw failure!
        }
    }

    private func skip(_ n: UInt64) {
        remaining = n
        state = n == 0 ? .header : .skip
    }

    private func bad(_ message: String) -> ArchiveError {
        ArchiveError(message, entry: currentName.map { display($0) }, offset: headerOffset)
    }

    // MARK: headers

    private func header() throws {
        let allZero = block.withUnsafeBytes { uvm_ar_all_zero($0.baseAddress, Tar.block) != 0 }
        if allZero {
            zeroBlocks += 1
            if zeroBlocks == 2 {
                guard longName == nil, longLink == nil, local.isEmpty else { throw bad("archive ends after an extended header, without its entry") }
                state = .end
            }
            return
        }
        zeroBlocks = 0
        currentName = nil
        try block.withUnsafeBytes { h in
            guard let stored = Tar.number(h, Tar.chksum) else { throw bad("header checksum field does not parse (not a tar archive?)") }
            let sums = Tar.checksums(h)
            guard stored == sums.unsigned || Int64(bitPattern: stored) == sums.signed else {
                throw bad("header checksum mismatch (stored \(stored), computed \(sums.unsigned)): corrupted, or not a tar archive")
            }
            let type = h[Tar.typeflag]
            switch type {
            case Tar.TypeFlag.paxLocal, Tar.TypeFlag.solarisPax: try startMeta(.pax, h)
            case Tar.TypeFlag.paxGlobal: try startMeta(.global, h)
            case Tar.TypeFlag.gnuLongName: try startMeta(.longName, h)
            case Tar.TypeFlag.gnuLongLink: try startMeta(.longLink, h)
            default: try entryHeader(h, type: type)
            }
        }
    }

    private func startMeta(_ kind: MetaKind, _ h: UnsafeRawBufferPointer) throws {
        guard let size = Tar.number(h, Tar.size) else { throw bad("extended header's size field does not parse") }
        guard size <= UInt64(options.maxHeaderDataSize) else {
            throw bad("extended header of \(size) bytes is larger than the \(options.maxHeaderDataSize) allowed")
        }
        metaKind = kind
        metaData = []
        metaData.reserveCapacity(Int(size))
        remaining = size
        if size == 0 { try metaDone() } else { state = .meta }
    }

    private func metaDone() throws {
        let data = metaData
        metaData = []
        let size = UInt64(data.count)
        switch metaKind {
        case .pax: try local.parse(data, options: options, global: false).get()
        case .global: try global.parse(data, options: options, global: true).get()
        case .longName, .longLink:
            // The GNU long name block is NUL-terminated.
            let name = Array(data.prefix { $0 != 0 })
            if metaKind == .longName { longName = name } else { longLink = name }
        }
        skip(UInt64(Tar.padding(size)))
    }

    /// What the next entry will be, once all its headers are read.
    private struct Pending {
        var name: [UInt8]
        var linkName: [UInt8]
        var type: UInt8
        var meta: Metadata
        var size: UInt64
        var devmajor: UInt32
        var devminor: UInt32
        var realSize: UInt64
        var extents: [(offset: UInt64, length: UInt64)]?
    }

    private func entryHeader(_ h: UnsafeRawBufferPointer, type: UInt8) throws {
        func num(_ field: (Int, Int), _ what: String) throws -> UInt64 {
            guard let v = Tar.number(h, field) else { throw bad("\(what) field does not parse") }
            return v
        }
        let posix = Tar.string(h, Tar.magic) == Array("ustar".utf8) && h[Tar.magic.0 + 5] == 0
        var name = Tar.string(h, Tar.name)
        if posix {
            let prefix = Tar.string(h, Tar.prefix)
            if !prefix.isEmpty { name = prefix + [0x2F] + name }
        }
        name = longName ?? local.path ?? global.path ?? name
        let linkName = longLink ?? local.linkpath ?? global.linkpath ?? Tar.string(h, Tar.linkname)
        currentName = name
        longName = nil
        longLink = nil
        let pax = local
        local = PaxFields()

        let mode = try num(Tar.mode, "mode")
        let uid = try pax.uid ?? global.uid ?? num(Tar.uid, "uid")
        let gid = try pax.gid ?? global.gid ?? num(Tar.gid, "gid")
        let size = try pax.size ?? num(Tar.size, "size")
        guard let headerMtime = Tar.signedNumber(h, Tar.mtime) else { throw bad("mtime field does not parse") }
        let mtime = pax.mtime ?? global.mtime ?? (headerMtime, 0)
        guard uid <= UInt64(UInt32.max), gid <= UInt64(UInt32.max) else { throw bad("uid or gid out of range") }
        guard size <= options.maxFileSize else { throw bad("size \(size) is absurd") }
        var devmajor: UInt64 = 0, devminor: UInt64 = 0
        if type == Tar.TypeFlag.char || type == Tar.TypeFlag.block {
            devmajor = try pax.devmajor ?? num(Tar.devmajor, "devmajor")
            devminor = try pax.devminor ?? num(Tar.devminor, "devminor")
            guard devmajor <= 0xfff, devminor <= 0xfffff else { throw bad("device number \(devmajor),\(devminor) out of range") }
        }
        var xattrs = global.xattrs
        for x in pax.xattrs {
            xattrs.removeAll { $0.name == x.name }
            xattrs.append(x)
        }
        // ACLs in text form become their xattrs, unless the archive also had those as xattrs.
        for (text, name) in [(pax.aclAccess, "system.posix_acl_access"), (pax.aclDefault, "system.posix_acl_default")] {
            guard let text, !xattrs.contains(where: { $0.name == Array(name.utf8) }) else { continue }
            if let value = PosixACL.xattr(fromText: text) {
                xattrs.append((Array(name.utf8), value))
            } else {
                stats.ignoredACLs += 1
            }
        }
        let owner = options.owner ?? ExtractOptions.Owner(uid: UInt32(uid), gid: UInt32(gid))
        var e = Pending(name: name, linkName: linkName, type: type,
                        meta: Metadata(mode: UInt32(mode & 0o7777) & ~options.clearedModeBits, uid: owner.uid, gid: owner.gid,
                                       mtime: mtime, xattrs: xattrs),
                        size: size, devmajor: UInt32(devmajor), devminor: UInt32(devminor), realSize: size, extents: nil)

        // GNU sparse files, in each of the forms GNU tar has written.
        if pax.sparseMajor == 1 {
            guard let real = pax.sparseRealSize ?? pax.sparseSize else { throw bad("sparse 1.0 entry without GNU.sparse.realsize") }
            e.name = pax.sparseName ?? e.name
            e.realSize = real
            currentName = e.name
            guard real <= options.maxFileSize else { throw bad("sparse real size \(real) is absurd") }
            pending = e
            mapParser = SparseMapParser()
            remaining = size
            state = .sparseMap
            return
        }
        if let map = pax.sparseMap {  // 0.0 and 0.1: the map is in the pax header
            guard let real = pax.sparseSize ?? pax.sparseRealSize else { throw bad("sparse entry without GNU.sparse.size") }
            e.name = pax.sparseName ?? e.name
            currentName = e.name
            e.realSize = real
            e.extents = map
            try validate(e)
        } else if type == Tar.TypeFlag.gnuSparse {
            var extents: [(offset: UInt64, length: UInt64)] = []
            try readOldSparse(h, at: Tar.gnuSparse, count: 4, into: &extents)
            e.realSize = try num(Tar.gnuRealSize, "sparse real size")
            e.extents = extents
            e.type = Tar.TypeFlag.regular
            if h[Tar.gnuIsExtended] != 0 {
                pending = e
                state = .sparseExtension
                return
            }
            try validate(e)
        }
        try start(e)
    }

    /// Old GNU sparse entries: (offset, numbytes) pairs of 12-byte numbers; an empty one ends the list.
    private func readOldSparse(_ h: UnsafeRawBufferPointer, at: Int, count: Int, into extents: inout [(offset: UInt64, length: UInt64)]) throws {
        for i in 0..<count {
            let o = at + i * 24
            if h[o] == 0 { return }
            guard let off = Tar.number(h, (o, 12)), let len = Tar.number(h, (o + 12, 12)) else { throw bad("sparse map field does not parse") }
            guard extents.count < options.maxSparseExtents else { throw bad("more than \(options.maxSparseExtents) sparse extents") }
            extents.append((off, len))
        }
    }

    private func sparseExtension() throws {
        var e = pending!
        var extents = e.extents ?? []
        let more = try block.withUnsafeBytes { h -> Bool in
            try readOldSparse(h, at: 0, count: 21, into: &extents)
            return h[504] != 0
        }
        e.extents = extents
        if more {
            pending = e
            return
        }
        pending = nil
        state = .header
        try validate(e)
        try start(e)
    }

    /// A sparse map must describe exactly the stored bytes, in order, within the real size.
    private func validate(_ e: Pending, stored: UInt64? = nil) throws {
        guard let extents = e.extents else { return }
        var end: UInt64 = 0
        var total: UInt64 = 0
        for x in extents {
            let (xEnd, o) = x.offset.addingReportingOverflow(x.length)
            guard !o, x.offset >= end, xEnd <= e.realSize else { throw bad("sparse map is out of order or beyond the file's size") }
            end = xEnd
            total += x.length
        }
        guard total == stored ?? e.size else { throw bad("sparse map describes \(total) bytes but the entry stores \(stored ?? e.size)") }
    }

    // MARK: GNU sparse 1.0 map (decimal numbers, one per line, at the start of the data)

    private struct SparseMapParser {
        var count: UInt64?
        var numbers: [UInt64] = []
        var current: UInt64 = 0
        var digits = 0
        var consumed: UInt64 = 0
    }

    private func sparseMapByte(_ b: UInt8) throws {
        guard remaining > 0 else { throw bad("sparse map runs past the entry's data") }
        remaining -= 1
        mapParser.consumed += 1
        if b >= 0x30 && b <= 0x39 {
            guard mapParser.digits < 20 else { throw bad("sparse map number too long") }
            let (m, o1) = mapParser.current.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(UInt64(b - 0x30))
            guard !o1, !o2 else { throw bad("sparse map number overflows") }
            mapParser.current = a
            mapParser.digits += 1
            return
        }
        guard b == 0x0A, mapParser.digits > 0 else { throw bad("sparse map is not decimal numbers on lines") }
        let v = mapParser.current
        mapParser.current = 0
        mapParser.digits = 0
        if mapParser.count == nil {
            guard v <= UInt64(options.maxSparseExtents) else { throw bad("sparse map of \(v) extents is more than the \(options.maxSparseExtents) allowed") }
            mapParser.count = v
        } else {
            mapParser.numbers.append(v)
        }
        guard let count = mapParser.count, mapParser.numbers.count == Int(count) * 2 else { return }

        // The map is padded to a block; the data follows.
        let pad = UInt64(Tar.padding(mapParser.consumed))
        guard pad <= remaining else { throw bad("sparse map runs past the entry's data") }
        var e = pending!
        pending = nil
        e.extents = stride(from: 0, to: mapParser.numbers.count, by: 2).map { (mapParser.numbers[$0], mapParser.numbers[$0 + 1]) }
        mapParser = SparseMapParser()
        let dataSize = remaining - pad
        try validate(e, stored: dataSize)
        let stored = e.size
        e.size = dataSize
        try start(e, mapPadding: pad, storedSize: stored)
    }

    // MARK: creating entries

    /// Path components beneath the root: leading '/' and '.' dropped, '..' refused.
    private func components(_ path: [UInt8]) throws -> [[UInt8]] {
        var out: [[UInt8]] = []
        for c in path.split(separator: 0x2F, omittingEmptySubsequences: true) {
            if c.elementsEqual([0x2E]) { continue }
            if c.elementsEqual([0x2E, 0x2E]) { throw bad("path '\(display(path))' contains '..'") }
            out.append(Array(c))
        }
        return out
    }

    /// `components`, with the top-level name checked and mapped (ExtractOptions.topLevelNames).
    private func placed(_ path: [UInt8]) throws -> [[UInt8]] {
        var comps = try components(path)
        guard let names = options.topLevelNames else { return comps }
        guard let first = comps.first, let to = names[first] else {
            let expected = names.keys.map { "'\(display($0))'" }.sorted().joined(separator: ", ")
            throw bad("'\(display(path))' is not beneath \(expected), which is all this archive should hold")
        }
        comps[0] = to
        return comps
    }

    /// Creates the entry; for a regular file, data then goes to `output` (after the sparse
    /// map's padding, for sparse 1.0). `storedSize`: the entry's bytes in the archive, which
    /// decide the padding after it.
    private func start(_ e: Pending, mapPadding: UInt64 = 0, storedSize: UInt64? = nil) throws {
        stats.entries += 1
        entryPadding = UInt64(Tar.padding(storedSize ?? e.size))
        var type = e.type
        if (type == Tar.TypeFlag.regular || type == Tar.TypeFlag.regularOld) && e.name.last == 0x2F && e.extents == nil {
            type = Tar.TypeFlag.directory  // pre-POSIX tars mark directories by the trailing '/'
        }
        let comps = try placed(e.name)
        if comps.isEmpty && type != Tar.TypeFlag.directory { throw bad("entry has an empty name") }
        switch type {
        case Tar.TypeFlag.directory, Tar.TypeFlag.gnuDumpDir:
            try dest.makeDirectory(comps, e.meta)
            stats.directories += 1
        case Tar.TypeFlag.symlink:
            try dest.makeSymlink(comps, target: e.linkName, e.meta)
            stats.symlinks += 1
        case Tar.TypeFlag.hardLink:
            let target = try placed(e.linkName)
            guard !target.isEmpty else { throw bad("hard link with an empty target") }
            try dest.makeHardLink(comps, target: target)
            stats.hardLinks += 1
        case Tar.TypeFlag.char, Tar.TypeFlag.block:
            try dest.makeNode(comps, type: type == Tar.TypeFlag.char ? S_IFCHR : S_IFBLK,
                              device: uvm_ar_makedev(e.devmajor, e.devminor), e.meta)
            stats.devices += 1
        case Tar.TypeFlag.fifo:
            try dest.makeNode(comps, type: S_IFIFO, device: 0, e.meta)
            stats.fifos += 1
        case Tar.TypeFlag.gnuVolume:
            stats.skipped += 1
        case Tar.TypeFlag.gnuMultiVolume:
            throw bad("multi-volume archives are not supported")
        default:  // regular files, contiguous files, and unknown types (POSIX: read as regular)
            let fd = try dest.makeFile(comps)
            output = FileOutput(fd: fd, extents: e.extents ?? [(0, e.size)], realSize: e.realSize)
            fileComps = comps
            fileMeta = e.meta
            stats.files += 1
            dataAfterPadding = e.size
            if mapPadding > 0 {
                remaining = mapPadding
                state = .mapPadding
            } else {
                try beginData()
            }
            return
        }
        // Data of entries that have nothing to hold it (a pax hard link may carry some) is skipped.
        skip(mapPadding + e.size + entryPadding)
    }

    private var entryPadding: UInt64 = 0
    private var dataAfterPadding: UInt64 = 0
    private var fileComps: [[UInt8]] = []
    private var fileMeta: Metadata?

    private func beginData() throws {
        remaining = dataAfterPadding
        if remaining == 0 { try fileDone() } else { state = .data }
    }

    private func fileDone() throws {
        guard let out = output else { return }
        output = nil
        defer { close(out.fd) }
        do {
            try out.finish()
            try dest.applyMetadata(fd: out.fd, fileMeta!, path: fileComps)
        }
        fileMeta = nil
        skip(entryPadding)
    }
}
