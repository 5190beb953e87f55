import CSyscalls
import Glibc

/// Where `uvm cp` finds and puts things: on the host, paths as they are; in the guest, paths
/// beneath a distribution's root, resolved as a process chrooted there would (absolute symlinks
/// and ".." included), never leaving it.
public struct CopyRoot: Sendable {
    /// AT_FDCWD for the host; else a directory that stands for "/".
    public let fd: Int32
    public init(fd: Int32) { self.fd = fd }
    public static let host = CopyRoot(fd: AT_FDCWD)

    /// A new descriptor (O_CLOEXEC), or -1 and errno.
    public func open(_ path: String, flags: Int32) -> Int32 {
        fd == AT_FDCWD ? uvm_ar_openat(AT_FDCWD, path, flags | uvm_ar_O_CLOEXEC, 0) : uvm_ar_open_in_root(fd, path, flags)
    }
}

/// cp's rules for sources and destinations, shared by the host and the guest side of `uvm cp`.
public enum CopyPaths {
    /// "a/b/c/" -> ("a/b", "c"); "c" -> (".", "c"); "/c" -> ("/", "c"). nil for "/" and for names
    /// that do not name an entry ("", ".", "..").
    public static func split(_ path: String) -> (parent: String, name: String)? {
        var p = Array(path.utf8)
        while p.count > 1 && p.last == 0x2F { p.removeLast() }
        guard let slash = p.lastIndex(of: 0x2F) else {
            return isName(p) ? (".", String(decoding: p, as: UTF8.self)) : nil
        }
        let name = Array(p[(slash + 1)...])
        guard isName(name) else { return nil }
        let parent = slash == 0 ? "/" : String(decoding: p[..<slash], as: UTF8.self)
        return (parent, String(decoding: name, as: UTF8.self))
    }

    private static func isName(_ n: [UInt8]) -> Bool { !n.isEmpty && n != [0x2E] && n != [0x2E, 0x2E] }

    /// The receiving side, as cp decides: into DEST when it is a directory (each source keeps its
    /// name); else DEST is the new name of the one source, in DEST's parent. Answers the directory
    /// to extract into (the caller owns the descriptor) and ExtractOptions.topLevelNames.
    public static func destination(_ dest: String, names: [String], root: CopyRoot) throws -> (fd: Int32, names: [[UInt8]: [UInt8]]) {
        let fd = root.open(dest, flags: O_RDONLY | uvm_ar_O_DIRECTORY)
        if fd >= 0 {
            var map: [[UInt8]: [UInt8]] = [:]
            for n in names { map[Array(n.utf8)] = Array(n.utf8) }
            return (fd, map)
        }
        let e = errno
        guard e == ENOENT || e == ENOTDIR else { throw ArchiveError.sys(dest, e) }
        guard names.count == 1 else {
            throw ArchiveError("\(dest): " + (e == ENOENT ? "no such directory" : "not a directory")
                + " (copying \(names.count) items needs an existing directory)", errno: e)
        }
        guard !dest.hasSuffix("/"), let (parent, name) = split(dest) else {
            throw ArchiveError("\(dest): " + (e == ENOENT ? "no such directory" : "not a directory"), errno: e)
        }
        let pfd = root.open(parent, flags: O_RDONLY | uvm_ar_O_DIRECTORY)
        guard pfd >= 0 else { throw ArchiveError.sys(parent, errno) }
        return (pfd, [Array(names[0].utf8): Array(name.utf8)])
    }

    /// The sending side: each source under its own name (`split(path).name`). Without
    /// `recursive` a symlink named on the command line is followed and a directory refused (cp);
    /// with it, symlinks are copied as links (cp -R).
    public static func send(_ sources: [String], root: CopyRoot, recursive: Bool, to tar: TarWriter) throws {
        for source in sources {
            guard let (parent, name) = split(source) else {
                throw ArchiveError("\(source): name a file or folder (not '/', '.' or '..')")
            }
            let dirfd = root.open(parent, flags: O_RDONLY | uvm_ar_O_DIRECTORY)
            guard dirfd >= 0 else { throw ArchiveError.sys(parent, errno) }
            defer { close(dirfd) }
            var st = stat()
            let exists = name.withCString { fstatat(dirfd, $0, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) }
            guard exists == 0 else { throw ArchiveError.sys(source, errno) }
            if st.st_mode & S_IFMT == S_IFDIR && !recursive { throw ArchiveError("\(source) is a folder: copy it with -r") }
            if st.st_mode & S_IFMT == S_IFLNK && !recursive {
                // Followed where the root says (in the guest: within the distro), then opened anew
                // as what it is: a fifo or device at the end of a link is not opened at all.
                let path = root.open(source, flags: uvm_ar_O_PATH)
                guard path >= 0 else { throw ArchiveError.sys(source, errno) }
                defer { close(path) }
                var tst = stat()
                let fmt = fstat(path, &tst) == 0 ? tst.st_mode & S_IFMT : 0
                guard fmt == S_IFREG else {
                    throw ArchiveError("\(source): the symlink leads to " + (fmt == S_IFDIR ? "a folder: copy it with -r" : "something that is not a file"))
                }
                let target = uvm_ar_openat(AT_FDCWD, "/proc/self/fd/\(path)", O_RDONLY | uvm_ar_O_CLOEXEC, 0)
                guard target >= 0 else { throw ArchiveError.sys(source, errno) }
                defer { close(target) }
                try tar.add(opened: target, as: Array(name.utf8), recursive: recursive)
            } else {
                try tar.add(in: dirfd, name: Array(name.utf8), as: Array(name.utf8), recursive: recursive)
            }
        }
    }
}
