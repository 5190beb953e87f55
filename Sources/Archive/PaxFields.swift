/// The pax extended header keywords the extractor acts on. Others (atime, ctime, uname, gname,
/// hdrcharset, comment, LIBARCHIVE.*) are read and ignored: names are taken as bytes whatever
/// the charset, and owners are numeric.
struct PaxFields {
    var path: [UInt8]?
    var linkpath: [UInt8]?
    var size: UInt64?
    var uid: UInt64?
    var gid: UInt64?
    var mtime: (sec: Int64, nsec: Int64)?
    var devmajor: UInt64?
    var devminor: UInt64?
    var xattrs: [(name: [UInt8], value: [UInt8])] = []
    /// POSIX ACLs in text form (SCHILY.acl.access / .default).
    var aclAccess: [UInt8]?
    var aclDefault: [UInt8]?
    // GNU sparse: 1.0 (major/minor, name, realsize, map in the data), 0.1 (size, map), 0.0 (offset/numbytes pairs).
    var sparseMajor: UInt64?
    var sparseName: [UInt8]?
    var sparseRealSize: UInt64?
    var sparseSize: UInt64?
    var sparseMap: [(offset: UInt64, length: UInt64)]?
    private var sparseOffset: UInt64?
    private var any = false

    var isEmpty: Bool { !any }

    private static let xattrPrefix = Array("SCHILY.xattr.".utf8)

    mutating func parse(_ data: [UInt8], options: ExtractOptions, global: Bool) -> Result<Void, ArchiveError> {
        let records: [(key: [UInt8], value: [UInt8])]
        switch Tar.paxRecords(data) {
        case .success(let r): records = r
        case .failure(let e): return .failure(e)
        }
        for (k, v) in records {
            let key = String(decoding: k, as: UTF8.self)
            func number() -> Result<UInt64?, ArchiveError> {
                if v.isEmpty { return .success(nil) }
                guard let n = Tar.decimal(v) else { return .failure(ArchiveError("pax \(key)=\(display(v.prefix(40))) does not parse")) }
                return .success(n)
            }
            func set(_ field: inout UInt64?) -> ArchiveError? {
                switch number() {
                case .success(let n): field = n; return nil
                case .failure(let e): return e
                }
            }
            var err: ArchiveError?
            any = any || !global
            switch key {
            case "path": path = v.isEmpty ? nil : v
            case "linkpath": linkpath = v.isEmpty ? nil : v
            case "size": err = set(&size)
            case "uid": err = set(&uid)
            case "gid": err = set(&gid)
            case "SCHILY.devmajor": err = set(&devmajor)
            case "SCHILY.devminor": err = set(&devminor)
            case "mtime":
                if v.isEmpty { mtime = nil } else if let t = Tar.paxTime(v) { mtime = t } else {
                    err = ArchiveError("pax mtime=\(display(v.prefix(40))) does not parse")
                }
            case "SCHILY.acl.access": aclAccess = v.isEmpty ? nil : v
            case "SCHILY.acl.default": aclDefault = v.isEmpty ? nil : v
            case "GNU.sparse.major": err = set(&sparseMajor)
            case "GNU.sparse.name": sparseName = v
            case "GNU.sparse.realsize": err = set(&sparseRealSize)
            case "GNU.sparse.size": err = set(&sparseSize)
            case "GNU.sparse.map":  // 0.1: "offset,size,offset,size,..."
                var map: [(offset: UInt64, length: UInt64)] = []
                let parts = v.split(separator: 0x2C, omittingEmptySubsequences: false)
                guard parts.count % 2 == 0, parts.count / 2 <= options.maxSparseExtents else {
                    return .failure(ArchiveError("pax GNU.sparse.map is malformed or too long"))
                }
                for i in stride(from: 0, to: parts.count, by: 2) {
                    guard let o = Tar.decimal(parts[i]), let l = Tar.decimal(parts[i + 1]) else {
                        return .failure(ArchiveError("pax GNU.sparse.map does not parse"))
                    }
                    map.append((o, l))
                }
                sparseMap = map
            case "GNU.sparse.offset": err = set(&sparseOffset)
            case "GNU.sparse.numbytes":  // 0.0: pairs of records, in order
                var n: UInt64?
                err = set(&n)
                if err == nil {
                    guard let o = sparseOffset, let n else { return .failure(ArchiveError("pax GNU.sparse.numbytes without an offset")) }
                    if sparseMap == nil { sparseMap = [] }
                    guard sparseMap!.count < options.maxSparseExtents else { return .failure(ArchiveError("too many sparse extents")) }
                    sparseMap!.append((o, n))
                    sparseOffset = nil
                }
            default:
                if k.starts(with: Self.xattrPrefix) {
                    let name = Array(k.dropFirst(Self.xattrPrefix.count))
                    guard !name.isEmpty else { return .failure(ArchiveError("pax xattr record without a name")) }
                    xattrs.removeAll { $0.name == name }
                    guard xattrs.count < options.maxXattrsPerEntry else {
                        return .failure(ArchiveError("more than \(options.maxXattrsPerEntry) xattrs in one entry"))
                    }
                    xattrs.append((name, v))
                }
            }
            if let err { return .failure(err) }
        }
        if let uid, uid > UInt64(UInt32.max) { return .failure(ArchiveError("pax uid \(uid) out of range")) }
        if let gid, gid > UInt64(UInt32.max) { return .failure(ArchiveError("pax gid \(gid) out of range")) }
        return .success(())
    }
}
