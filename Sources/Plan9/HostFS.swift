import CPlan9
import Glibc
import NIOConcurrencyHelpers

// The only door from the server to the host file system. Everything here works on file descriptors;
// no function takes a path string that the guest influenced except as one validated component
// resolved relative to a directory fd without following symlinks.

/// A Linux errno, sent to the guest in Rlerror.
public struct P9Errno: Error, Equatable, CustomStringConvertible {
    public var code: Int32
    public init(_ code: Int32) { self.code = code }
    public var description: String { "errno \(code) (\(String(cString: strerror(code))))" }
}

@inline(__always)
func sys(_ body: () -> Int32) throws(P9Errno) -> Int32 {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e != EINTR { throw P9Errno(e) }
    }
}

@inline(__always)
func sysSize(_ body: () -> Int) throws(P9Errno) -> Int {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = errno
        if e != EINTR { throw P9Errno(e) }
    }
}

/// An owned file descriptor, closed when the last reference goes. Reference counting (rather than
/// closing on Tclunk) means an operation still running on a pool thread never sees its fd number
/// closed and reused under it.
final class HostFD: Sendable {
    let raw: Int32
    /// The session's descriptor budget, paid back when this closes (nil: not counted, e.g. the
    /// export root or a descriptor that lives for one request).
    private let lease: Lease?
    init(_ raw: Int32, lease: Lease? = nil) {
        self.raw = raw
        self.lease = lease
    }
    deinit { close(raw) }

    /// "/proc/self/fd/N": only for the xattr calls, which have no fd-relative form that works on
    /// cp9_O_PATH descriptors. The magic link resolves to exactly this fd's inode; callers only use it
    /// for regular files and directories, never for a symlink fd (whose link body must not be
    /// followed).
    var procPath: String { "/proc/self/fd/\(raw)" }
}

/// File type bits (S_IFMT) as plain values.
enum FileType: UInt32 {
    case fifo = 0o010000
    case chr = 0o020000
    case dir = 0o040000
    case blk = 0o060000
    case reg = 0o100000
    case lnk = 0o120000
    case sock = 0o140000

    init?(mode: UInt32) { self.init(rawValue: mode & 0o170000) }

    var qidType: UInt8 {
        switch self {
        case .dir: return P9.QidType.dir
        case .lnk: return P9.QidType.symlink
        default: return P9.QidType.file
        }
    }

    /// Only these are ever opened for I/O: opening a device, FIFO or socket on the host can block
    /// or have side effects (a tape rewinds, a watchdog arms).
    var openable: Bool { self == .reg || self == .dir }
}

typealias HostStat = cp9_stat

extension cp9_stat {
    var fileType: FileType? { FileType(mode: mode) }
}

enum HostFS {
    static let procSelfFD: Int32 = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC)

    /// NUL-terminated copy of a validated component.
    static func cName(_ name: [UInt8]) -> [CChar] {
        var c = name.map { CChar(bitPattern: $0) }
        c.append(0)
        return c
    }

    /// A name the guest asks to create or look up in a directory: one component, nothing that the
    /// kernel would resolve as more than that.
    static func validateName(_ name: [UInt8]) throws(P9Errno) {
        if name.isEmpty || name.contains(0) || name.contains(UInt8(ascii: "/")) { throw P9Errno(EINVAL) }
        if name == [UInt8(ascii: ".")] || name == [UInt8(ascii: "."), UInt8(ascii: ".")] { throw P9Errno(EINVAL) }
        if name.count > 255 { throw P9Errno(ENAMETOOLONG) }
    }

    static func openDirectory(path: String) throws(P9Errno) -> HostFD {
        HostFD(try sys { open(path, cp9_O_PATH | O_DIRECTORY | O_CLOEXEC) })
    }

    /// One component beneath `dir`, never following a symlink (an cp9_O_PATH fd to a symlink refers to
    /// the link itself).
    static func openBeneath(_ dir: HostFD, _ name: [UInt8], flags: Int32, mode: UInt32 = 0,
                            lease: Lease? = nil) throws(P9Errno) -> HostFD {
        try validateName(name)
        let c = cName(name)
        return HostFD(try sys { cp9_open_beneath(dir.raw, c, flags, mode) }, lease: lease)
    }

    /// The parent of `dir` (".."), an cp9_O_PATH fd. The caller checks it is still inside the export.
    static func openParent(_ dir: HostFD, lease: Lease? = nil) throws(P9Errno) -> HostFD {
        HostFD(try sys { openat(dir.raw, "..", cp9_O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }, lease: lease)
    }

    /// The kernel's current absolute name for the inode behind `fd`, or nil when it has none that
    /// could be resolved again (unlinked, longer than PATH_MAX, not reachable from our root).
    static func currentPath(_ fd: HostFD) -> [UInt8]? {
        guard procSelfFD >= 0 else { return nil }
        let num = cName(Array(String(fd.raw).utf8))
        var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = buf.withUnsafeMutableBytes { readlinkat(procSelfFD, num, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
        guard n > 0, n < Int(PATH_MAX), buf[0] == UInt8(ascii: "/") else { return nil }
        let path = Array(buf[0..<n])
        if path.suffix(10).elementsEqual(" (deleted)".utf8) { return nil }
        return path
    }

    /// A relative path of several components beneath `dir`, no symlink followed (ENOSYS without
    /// openat2).
    static func openBeneath(_ dir: HostFD, path: [UInt8], flags: Int32) throws(P9Errno) -> HostFD {
        let c = cName(path)
        return HostFD(try sys { cp9_open_beneath_path(dir.raw, c, flags) })
    }

    /// Opens the inode behind an cp9_O_PATH fd for I/O. The caller has checked that the inode is a
    /// regular file or directory; the result is checked again to be that same inode.
    static func reopen(_ fd: HostFD, flags: Int32, expect st: HostStat, lease: Lease? = nil) throws(P9Errno) -> HostFD {
        guard procSelfFD >= 0 else { throw P9Errno(EOPNOTSUPP) }
        guard let t = st.fileType, t.openable else { throw P9Errno(EPERM) }
        let num = cName(Array(String(fd.raw).utf8))
        // O_NONBLOCK: a FIFO can never block this thread, even if something above is wrong.
        let newFD = HostFD(try sys { openat(procSelfFD, num, flags | O_CLOEXEC | O_NOCTTY | O_NONBLOCK) }, lease: lease)
        let nst = try stat(newFD)
        guard nst.dev == st.dev, nst.ino == st.ino, nst.fileType == t else { throw P9Errno(ESTALE) }
        if flags & O_NONBLOCK == 0 {
            let fl = fcntl(newFD.raw, F_GETFL)
            if fl >= 0 { _ = fcntl(newFD.raw, F_SETFL, fl & ~O_NONBLOCK) }
        }
        return newFD
    }

    /// An cp9_O_PATH fd for the inode behind an open fd (after create, without looking the name up again).
    static func pathFD(of fd: HostFD, lease: Lease? = nil) throws(P9Errno) -> HostFD {
        guard procSelfFD >= 0 else { throw P9Errno(EOPNOTSUPP) }
        let num = cName(Array(String(fd.raw).utf8))
        return HostFD(try sys { openat(procSelfFD, num, cp9_O_PATH | O_CLOEXEC) }, lease: lease)
    }

    /// A directory's first entry but "." and ".." (through any descriptor of it, cp9_O_PATH too),
    /// nil if it has none. One that cannot be read answers ".".
    static func firstEntry(_ fd: HostFD) -> [UInt8]? {
        guard let d = opendir(fd.procPath) else { return [UInt8(ascii: ".")] }
        defer { closedir(d) }
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { Array($0.prefix { $0 != 0 }) }
            if name != [UInt8(ascii: ".")] && name != [UInt8(ascii: "."), UInt8(ascii: ".")] { return name }
        }
        return nil
    }

    static func stat(_ fd: HostFD) throws(P9Errno) -> HostStat {
        var st = cp9_stat()
        _ = try sys { cp9_stat(fd.raw, "", &st) }
        return st
    }

    static func statAt(_ dir: HostFD, _ name: [UInt8]) throws(P9Errno) -> HostStat {
        try validateName(name)
        var st = cp9_stat()
        let c = cName(name)
        _ = try sys { cp9_stat(dir.raw, c, &st) }
        return st
    }

    /// chmod/utimensat on the inode itself via /proc/self/fd/N relative to the /proc/self/fd dir fd.
    /// Not for symlink fds (see procPath).
    static func chmod(_ fd: HostFD, _ mode: UInt32) throws(P9Errno) {
        guard procSelfFD >= 0 else { throw P9Errno(EOPNOTSUPP) }
        let num = cName(Array(String(fd.raw).utf8))
        _ = try sys { fchmodat(procSelfFD, num, mode_t(mode), 0) }
    }

    static func utimens(_ fd: HostFD, isSymlink: Bool, _ times: [timespec]) throws(P9Errno) {
        do throws(P9Errno) {
            _ = try sys { utimensat(fd.raw, "", times, cp9_AT_EMPTY_PATH) }
        } catch let e where e.code == EINVAL && !isSymlink && procSelfFD >= 0 {
            // Kernels before AT_EMPTY_PATH support in utimensat.
            let num = cName(Array(String(fd.raw).utf8))
            _ = try sys { utimensat(procSelfFD, num, times, 0) }
        }
    }

    static func readlink(_ fd: HostFD) throws(P9Errno) -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try sysSize { buf.withUnsafeMutableBytes { readlinkat(fd.raw, "", $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) } }
        if n > Int(PATH_MAX) { throw P9Errno(ENAMETOOLONG) }
        return Array(buf[0..<n])
    }

    // MARK: xattrs (regular files and directories only)

    static func getxattr(_ fd: HostFD, _ name: String) throws(P9Errno) -> [UInt8] {
        var size = 4096
        while true {
            var buf = [UInt8](repeating: 0, count: size)
            let path = fd.procPath
            let n = buf.withUnsafeMutableBytes { cp9_getxattr(path, name, $0.baseAddress, $0.count) }
            if n >= 0 { return Array(buf[0..<n]) }
            let e = errno
            if e == ERANGE && size < 65536 { size = 65536; continue }
            if e == EINTR { continue }
            throw P9Errno(e)
        }
    }

    static func listxattr(_ fd: HostFD) throws(P9Errno) -> [String] {
        var size = 4096
        while true {
            var buf = [CChar](repeating: 0, count: size)
            let path = fd.procPath
            let n = cp9_listxattr(path, &buf, buf.count)
            if n >= 0 {
                return buf[0..<n].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
            }
            let e = errno
            if e == ERANGE && size < 65536 { size = 65536; continue }
            if e == EINTR { continue }
            throw P9Errno(e)
        }
    }

    static func setxattr(_ fd: HostFD, _ name: String, _ value: [UInt8], flags: Int32) throws(P9Errno) {
        let path = fd.procPath
        _ = try sys { value.withUnsafeBytes { cp9_setxattr(path, name, $0.baseAddress, $0.count, flags) } }
    }

    static func removexattr(_ fd: HostFD, _ name: String) throws(P9Errno) {
        let path = fd.procPath
        _ = try sys { cp9_removexattr(path, name) }
    }
}

/// qid.path must be unique across the whole export, which can span several host file systems
/// (bind mounts, submounts): inode numbers alone collide between them. Each device gets a 16-bit
/// index in the high bits; inode numbers that do not fit in the low 48 bits (some XFS, overlayfs
/// xino) get a counter in a reserved device index instead. Mappings live as long as the server so
/// one file keeps one qid across sessions.
final class QidMapper: @unchecked Sendable {
    private struct DevIno: Hashable {
        var dev: UInt64
        var ino: UInt64
    }

    private let lock = NIOLock()
    private var devices: [UInt64: UInt64] = [:]
    private var overflow: [DevIno: UInt64] = [:]
    private static let overflowIndex: UInt64 = 0xFFFF
    private static let inoMask: UInt64 = (1 << 48) - 1

    init(rootDev: UInt64) {
        devices[rootDev] = 0
    }

    func path(dev: UInt64, ino: UInt64) -> UInt64 {
        lock.withLock {
            var index = devices[dev]
            if index == nil, UInt64(devices.count) < QidMapper.overflowIndex {
                index = UInt64(devices.count)
                devices[dev] = index
            }
            if let index, ino <= QidMapper.inoMask {
                return index << 48 | ino
            }
            let key = DevIno(dev: dev, ino: ino)
            if let p = overflow[key] { return p }
            let p = QidMapper.overflowIndex << 48 | UInt64(overflow.count)
            overflow[key] = p
            return p
        }
    }

    func qid(_ st: HostStat) -> Qid {
        Qid(type: st.fileType?.qidType ?? P9.QidType.file, version: 0, path: path(dev: st.dev, ino: st.ino))
    }
}
