import CSyscalls
import Glibc

/// What an entry's inode gets besides its contents.
struct Metadata {
    var mode: UInt32
    var uid: UInt32
    var gid: UInt32
    var mtime: (sec: Int64, nsec: Int64)
    var xattrs: [(name: [UInt8], value: [UInt8])] = []
}

/// The extraction root and every file-system change made beneath it.
///
/// Confinement: paths arrive as validated components (no "..", no "/", no empty ones), and every
/// directory is entered with openat(O_NOFOLLOW | O_DIRECTORY) one component at a time from the
/// root's descriptor, so a symlink the archive made (say `a -> /`) is never followed: `a/etc/x`
/// then fails instead of writing to /etc. Leaves are created with *at calls on the parent's
/// descriptor, which do not follow a final symlink either (O_EXCL, mknodat, symlinkat, linkat
/// without AT_SYMLINK_FOLLOW).
final class Destination {
    let rootFD: Int32
    let preserveOwnership: Bool
    /// Non-root extraction cannot set security.*/trusted.* xattrs: those failures are counted, not fatal.
    private(set) var ignoredXattrs = 0
    private var cached: (comps: ArraySlice<[UInt8]>, fd: Int32)?
    /// Directories get owner, mode, xattrs and times after everything inside them exists:
    /// creating their entries would change their mtime, and a read-only mode would get in the way.
    private var deferred: [(comps: [[UInt8]], meta: Metadata)] = []

    init(path: String, preserveOwnership: Bool) throws {
        rootFD = try check("open destination \(path)") {
            uvm_ar_openat(AT_FDCWD, path, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_CLOEXEC, 0)
        }
        self.preserveOwnership = preserveOwnership
    }

    init(rootFD: Int32, preserveOwnership: Bool) {
        self.rootFD = rootFD
        self.preserveOwnership = preserveOwnership
    }

    deinit {
        if let cached { close(cached.fd) }
        close(rootFD)
    }

    // MARK: directories

    /// A new descriptor for the directory at `comps` (the root when empty), entered without
    /// following symlinks; missing directories are created (0755) when `create`.
    func openDirectory(_ comps: ArraySlice<[UInt8]>, create: Bool) throws -> Int32 {
        var cur = try check("dup") { dup(rootFD) }
        var walked: [UInt8] = []
        for c in comps {
            if !walked.isEmpty { walked.append(0x2F) }
            walked += c
            var fd = withCString(c) { uvm_ar_openat(cur, $0, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0) }
            if fd < 0, errno == ENOENT, create {
                if withCString(c, { mkdirat(cur, $0, 0o755) }) != 0, errno != EEXIST {
                    let e = errno
                    close(cur)
                    throw ArchiveError.sys("mkdir \(display(walked))", e)
                }
                fd = withCString(c) { uvm_ar_openat(cur, $0, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0) }
            }
            let e = errno
            close(cur)
            if fd < 0 {
                if e == ELOOP || e == ENOTDIR {
                    throw ArchiveError("'\(display(walked))' is a symlink or not a directory: refusing to go through it", errno: e)
                }
                throw ArchiveError.sys("open \(display(walked))", e)
            }
            cur = fd
        }
        return cur
    }

    /// The parent directory of `comps`, kept open while consecutive entries share it (archives
    /// list a directory's entries together). The caller must not close it.
    private func parent(of comps: [[UInt8]]) throws -> Int32 {
        let p = comps.dropLast()
        if let cached, cached.comps == p { return cached.fd }
        if let cached { close(cached.fd) }
        cached = nil
        let fd = try openDirectory(p, create: true)
        cached = (p, fd)
        return fd
    }

    private func forgetCache() {
        if let cached { close(cached.fd) }
        cached = nil
    }

    /// Runs `create` on (parent, name); when the name exists, removes what is there (an empty
    /// directory included) and tries once more, so an archive overrides an earlier entry as tar does.
    private func create(_ comps: [[UInt8]], _ what: String, _ body: (Int32, UnsafePointer<CChar>) -> Int32) throws -> (dirfd: Int32, result: Int32) {
        let dirfd = try parent(of: comps)
        return try withCString(comps.last!) { name in
            var r = body(dirfd, name)
            if r < 0, errno == EEXIST {
                var st = stat()
                if fstatat(dirfd, name, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) == 0 {
                    let isDir = st.st_mode & S_IFMT == S_IFDIR
                    if unlinkat(dirfd, name, isDir ? uvm_ar_AT_REMOVEDIR : 0) != 0 {
                        throw ArchiveError.sys("replace existing \(display(comps.joined(separator: [0x2F])))")
                    }
                    if isDir {
                        // Only an empty directory can go, but a cached descriptor may point into it.
                        forgetCache()
                        return try self.create(comps, what, body)
                    }
                }
                r = body(dirfd, name)
            }
            if r < 0 { throw ArchiveError.sys("\(what) \(display(comps.joined(separator: [0x2F])))") }
            return (dirfd, r)
        }
    }

    func makeDirectory(_ comps: [[UInt8]], _ meta: Metadata) throws {
        if !comps.isEmpty {
            let dirfd = try parent(of: comps)
            try withCString(comps.last!) { name in
                if mkdirat(dirfd, name, 0o700) == 0 { return }
                let e = errno
                var st = stat()
                if e == EEXIST, fstatat(dirfd, name, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) == 0 {
                    if st.st_mode & S_IFMT == S_IFDIR { return }  // already there (an earlier entry, or made as a parent)
                    try check("replace existing \(display(comps.joined(separator: [0x2F])))") { unlinkat(dirfd, name, 0) }
                    try check("mkdir \(display(comps.joined(separator: [0x2F])))") { mkdirat(dirfd, name, 0o700) }
                    return
                }
                throw ArchiveError.sys("mkdir \(display(comps.joined(separator: [0x2F])))", e)
            }
        }
        deferred.append((comps, meta))
    }

    /// Applies the directories' metadata, after all entries exist.
    func finishDirectories() throws {
        forgetCache()
        let dirs = deferred
        deferred = []
        for d in dirs {
            let fd: Int32
            do {
                fd = try openDirectory(d.comps[...], create: false)
            } catch let e as ArchiveError where e.errno == ENOENT || e.errno == ELOOP || e.errno == ENOTDIR {
                continue  // a later entry replaced it
            }
            defer { close(fd) }
            try applyMetadata(fd: fd, d.meta, path: d.comps)
        }
    }

    // MARK: leaves

    /// A new regular file, open for writing; nothing is written yet, so unwritten ranges are holes.
    func makeFile(_ comps: [[UInt8]]) throws -> Int32 {
        try create(comps, "create") { dirfd, name in
            uvm_ar_openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0o600)
        }.result
    }

    func makeSymlink(_ comps: [[UInt8]], target: [UInt8], _ meta: Metadata) throws {
        let (dirfd, _) = try withCString(target) { t in try create(comps, "symlink") { symlinkat(t, $0, $1) } }
        try applyMetadata(dirfd: dirfd, name: comps.last!, meta, isSymlink: true, path: comps)
    }

    func makeNode(_ comps: [[UInt8]], type: mode_t, device: UInt64, _ meta: Metadata) throws {
        let (dirfd, _) = try create(comps, "mknod") { uvm_ar_mknodat($0, $1, UInt32(type) | 0o600, device) }
        try applyMetadata(dirfd: dirfd, name: comps.last!, meta, isSymlink: false, path: comps)
    }

    /// A hard link to an earlier entry; the target is reached the same confined way.
    func makeHardLink(_ comps: [[UInt8]], target: [[UInt8]]) throws {
        if comps == target { return }  // a link to itself: removing the name first would lose the file
        let tdir: Int32
        do {
            tdir = try openDirectory(target.dropLast(), create: false)
        } catch var e as ArchiveError {
            e.message = "hard link target '\(display(target.joined(separator: [0x2F])))': " + e.message
            throw e
        }
        defer { close(tdir) }
        _ = try withCString(target.last!) { t in
            try create(comps, "link to \(display(target.joined(separator: [0x2F])))") { linkat(tdir, t, $0, $1, 0) }
        }
    }

    // MARK: metadata

    /// A new inode in a directory with a default ACL inherits an ACL the archive may not have
    /// (when extracting over an existing tree): it goes first, before the mode is set.
    private static let acls = [Array("system.posix_acl_access".utf8), Array("system.posix_acl_default".utf8)]

    /// Owner, then mode (chown clears setuid/setgid), then xattrs (chown clears
    /// security.capability), then times (the others change ctime only, but xattr writes would
    /// not touch mtime either; times last is simply the safe order).
    func applyMetadata(fd: Int32, _ meta: Metadata, path: [[UInt8]]) throws {
        let name = display(path.joined(separator: [0x2F]))
        for acl in Self.acls where !meta.xattrs.contains(where: { $0.name == acl }) {
            _ = withCString(acl) { uvm_ar_fremovexattr(fd, $0) }  // inherited, not archived (ENODATA is the usual answer)
        }
        if preserveOwnership { try check("chown \(name)") { fchown(fd, meta.uid, meta.gid) } }
        try check("chmod \(name)") { fchmod(fd, mode_t(meta.mode & 0o7777)) }
        for x in meta.xattrs {
            let r = withCString(x.name) { n in x.value.withUnsafeBytes { uvm_ar_fsetxattr(fd, n, $0.baseAddress, $0.count) } }
            if r != 0 { try xattrFailed(x.name, name) }
        }
        try check("set times of \(name)") {
            uvm_ar_utimens(fd, nil, 0, uvm_ar_UTIME_OMIT, meta.mtime.sec, Int(meta.mtime.nsec), 0)
        }
    }

    /// The same for what cannot be opened for writing (symlinks, devices, fifos): *at calls that
    /// do not follow the final name, and xattrs through /proc/self/fd/DIR/NAME with lsetxattr.
    private func applyMetadata(dirfd: Int32, name: [UInt8], _ meta: Metadata, isSymlink: Bool, path: [[UInt8]]) throws {
        let shown = display(path.joined(separator: [0x2F]))
        try withCString(name) { cname in
            if preserveOwnership {
                try check("chown \(shown)") { fchownat(dirfd, cname, meta.uid, meta.gid, uvm_ar_AT_SYMLINK_NOFOLLOW) }
            }
            if !isSymlink {
                // The node was just made by us in a directory we hold open: the name is not a symlink.
                try check("chmod \(shown)") { fchmodat(dirfd, cname, mode_t(meta.mode & 0o7777), 0) }
            }
            let proc = Array("/proc/self/fd/\(dirfd)/".utf8) + name
            if !isSymlink {
                for acl in Self.acls where !meta.xattrs.contains(where: { $0.name == acl }) {
                    _ = withCString(proc) { p in withCString(acl) { uvm_ar_lremovexattr(p, $0) } }
                }
            }
            if !meta.xattrs.isEmpty {
                for x in meta.xattrs {
                    let r = withCString(proc) { p in withCString(x.name) { n in
                        x.value.withUnsafeBytes { uvm_ar_lsetxattr(p, n, $0.baseAddress, $0.count) }
                    } }
                    if r != 0 { try xattrFailed(x.name, shown) }
                }
            }
            try check("set times of \(shown)") {
                uvm_ar_utimens(dirfd, cname, 0, uvm_ar_UTIME_OMIT, meta.mtime.sec, Int(meta.mtime.nsec), uvm_ar_AT_SYMLINK_NOFOLLOW)
            }
        }
    }

    private func xattrFailed(_ name: [UInt8], _ path: String) throws {
        let e = errno
        // Without root, privileged namespaces (security.*, trusted.*) and user.* on symlinks are refused.
        if !preserveOwnership, e == EPERM || e == EACCES || e == ENOTSUP {
            ignoredXattrs += 1
            return
        }
        throw ArchiveError.sys("set xattr \(display(name)) on \(path)", e)
    }
}
