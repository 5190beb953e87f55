import CSyscalls
import Foundation
import Glibc

/// security.capability, VFS_CAP_REVISION_2, effective, permitted = cap_net_raw (bit 13): what
/// `setcap cap_net_raw+ep` writes.
let capNetRaw: [UInt8] = [0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]

/// A name that is not UTF-8.
let invalidUTF8Name: [UInt8] = Array("bad-".utf8) + [0xff, 0xfe, 0xc3] + Array(".bin".utf8)

struct TreeError: Error, CustomStringConvertible { var description: String }

func ok(_ r: Int32, _ what: String) throws { if r != 0 { throw TreeError(description: "\(what): \(String(cString: strerror(errno)))") } }

/// A tree with every kind of entry; `privileged` adds what needs root (other owners, devices,
/// security.capability, a read-only directory). `sparseSize`: the sparse file's size.
func buildTree(_ root: String, privileged: Bool, sparseSize: Int64 = 1 << 30) throws {
    func p(_ rel: String) -> [CChar] { cpath(Array((root + "/" + rel).utf8)) }
    func pb(_ rel: [UInt8]) -> [CChar] { cpath(Array(root.utf8) + [0x2F] + rel) }
    func write(_ path: [CChar], _ data: [UInt8], mode: mode_t = 0o644) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
        guard fd >= 0 else { throw TreeError(description: "create: \(errno)") }
        defer { close(fd) }
        if !data.isEmpty { guard Glibc.write(fd, data, data.count) == data.count else { throw TreeError(description: "write") } }
        try ok(fchmod(fd, mode), "chmod")
    }
    for d in ["a", "b", "x", "run", "empty", "long", "bin", "dev"] { try ok(mkdir(p(d), 0o755), "mkdir \(d)") }
    try ok(mkdir(p("tmp"), 0o755), "mkdir tmp")
    try ok(chmod(p("tmp"), 0o1777), "chmod tmp")
    try ok(mkdir(p("sgid"), 0o755), "mkdir sgid")
    try ok(chmod(p("sgid"), 0o2775), "chmod sgid")

    try write(p("a/hl1"), Array("hard linked\n".utf8))
    try ok(link(p("a/hl1"), p("b/hl2")), "link")
    try ok(symlink("a/hl1", p("lnk")), "symlink")
    try ok(symlink("/nonexistent/target", p("dangle")), "symlink")
    try ok(symlink(String(repeating: "t", count: 150) + "/end", p("longlink")), "symlink")
    try write(p("x/file"), Array("with an xattr\n".utf8), mode: 0o600)
    let userValue: [UInt8] = [0, 1, 0xff, 0x80, 0x3D, 0x0A, 0x20]
    try ok(uvm_ar_lsetxattr(p("x/file"), "user.test", userValue, userValue.count), "setxattr user.test")
    // POSIX ACLs are xattrs too (system.posix_acl_*): an access ACL naming uid 1234, and a
    // default ACL on a directory, which must not leak into the extracted files inside it.
    func acl(_ entries: [(tag: UInt16, perm: UInt16, id: UInt32)]) -> [UInt8] {
        var b: [UInt8] = [2, 0, 0, 0]
        for e in entries { b += withUnsafeBytes(of: e.tag.littleEndian, Array.init) + withUnsafeBytes(of: e.perm.littleEndian, Array.init) + withUnsafeBytes(of: e.id.littleEndian, Array.init) }
        return b
    }
    let access = acl([(1, 6, .max), (2, 6, 1234), (4, 4, .max), (0x10, 6, .max), (0x20, 4, .max)])
    try write(p("x/acl"), Array("acl\n".utf8), mode: 0o664)
    try ok(uvm_ar_lsetxattr(p("x/acl"), "system.posix_acl_access", access, access.count), "set access ACL")
    try ok(mkdir(p("acldir"), 0o755), "mkdir")
    try write(p("acldir/plain"), Array("plain\n".utf8), mode: 0o600)  // made before the default ACL: it has none
    let dflt = acl([(1, 7, .max), (2, 5, 1234), (4, 5, .max), (0x10, 5, .max), (0x20, 5, .max)])
    try ok(uvm_ar_lsetxattr(p("acldir"), "system.posix_acl_default", dflt, dflt.count), "set default ACL")
    try ok(mkfifo(p("run/fifo"), 0o620), "mkfifo")
    try write(p("héllo-日本.txt"), Array("unicode\n".utf8))
    try write(pb(invalidUTF8Name), Array("invalid utf-8 name\n".utf8))
    let longDir = "long/" + String(repeating: "n", count: 90) + "/" + String(repeating: "m", count: 90)
    try ok(mkdir(p("long/" + String(repeating: "n", count: 90)), 0o755), "mkdir")
    try ok(mkdir(p(longDir), 0o755), "mkdir")
    try write(p(longDir + "/file-" + String(repeating: "f", count: 20)), Array("deep\n".utf8))  // a 217-byte path
    try write(p(String(repeating: "z", count: 200)), Array("long name\n".utf8))
    try write(p("emptyfile"), [])
    try write(p("zeros.bin"), [UInt8](repeating: 0, count: 1 << 20) + [1])  // written zeros: may come back as holes
    try write(p("script.sh"), Array("#!/bin/sh\n".utf8), mode: 0o755)

    // Sparse: a few data extents in a large hole, and one file ending in a hole.
    func sparse(_ name: String, size: Int64, extents: [(Int64, Int)]) throws {
        let fd = open(p(name), O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw TreeError(description: "create \(name)") }
        defer { close(fd) }
        try ok(ftruncate(fd, off_t(size)), "truncate")
        for (i, (off, len)) in extents.enumerated() {
            let data = (0..<len).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i + 1) }
            guard pwrite(fd, data, len, off_t(off)) == len else { throw TreeError(description: "pwrite") }
        }
    }
    try sparse("sparse.img", size: sparseSize,
               extents: [(0, 4096), (sparseSize / 10, 65536), (sparseSize / 10 * 7, 4096), (sparseSize - 4096, 4096)])
    try sparse("tailhole.img", size: 8 << 20, extents: [(1 << 20, 8192)])
    // More extents than an old GNU sparse header holds (4), and than one extension block (21).
    try sparse("many.img", size: 64 << 20, extents: (0..<30).map { (Int64($0) << 21 + 4096, 4096) })

    // A unix socket: the writer skips it.
    let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let sockPath = Array((root + "/run/sock").utf8)
    withUnsafeMutableBytes(of: &addr.sun_path) { for (i, b) in sockPath.enumerated() { $0[i] = b } }
    try ok(withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }, "bind")
    close(s)

    if privileged {
        try write(p("bin/su"), Array("setuid\n".utf8), mode: 0o755)
        try ok(chown(p("bin/su"), 1234, 5678), "chown")
        try ok(chmod(p("bin/su"), 0o4755), "chmod")
        try write(p("bin/ping"), Array("capable\n".utf8), mode: 0o755)
        try ok(uvm_ar_lsetxattr(p("bin/ping"), "security.capability", capNetRaw, capNetRaw.count), "setxattr security.capability")
        try ok(uvm_ar_mknodat(AT_FDCWD, p("dev/null"), UInt32(S_IFCHR) | 0o666, uvm_ar_makedev(1, 3)), "mknod")
        try ok(chmod(p("dev/null"), 0o666), "chmod")
        try ok(uvm_ar_mknodat(AT_FDCWD, p("dev/sda"), UInt32(S_IFBLK) | 0o660, uvm_ar_makedev(8, 0)), "mknod")
        try ok(lchown(p("dev/sda"), 0, 6), "chown")
        try write(p("bigid"), Array("large ids\n".utf8))
        try ok(chown(p("bigid"), 3_000_000, 3_000_001), "chown")  // beyond ustar's 7 octal digits
        try ok(lchown(p("lnk"), 42, 43), "lchown")
        try ok(mkdir(p("ro"), 0o755), "mkdir")
        try write(p("ro/inside"), Array("in a read-only dir\n".utf8))
        try ok(chmod(p("ro"), 0o555), "chmod")
        try ok(chown(p("sgid"), 100, 50), "chown")
    }
    try setTimes(root)
}

/// Gives every entry a distinct mtime with nanoseconds, children before their directory.
func setTimes(_ root: String) throws {
    var i = 0
    func visit(_ full: [UInt8]) throws {
        var st = stat()
        try ok(lstat(cpath(full), &st), "lstat")
        if st.st_mode & S_IFMT == S_IFDIR {
            guard let d = opendir(cpath(full)) else { throw TreeError(description: "opendir") }
            var names: [[UInt8]] = []
            while let p = uvm_ar_readdir_name(UnsafeMutableRawPointer(d)) {
                let n = Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
                if n != [0x2E] && n != [0x2E, 0x2E] { names.append(n) }
            }
            closedir(d)
            for n in names { try visit(full + [0x2F] + n) }
        }
        i += 1
        // One entry from before 1970, in whole seconds: libarchive reads and writes "-1.5" as
        // -1 + 0.5 where POSIX (and GNU tar, and we) mean -1.5, so fractions would differ there.
        let before1970 = full.split(separator: 0x2F).last.map { Array($0) } == Array("script.sh".utf8)
        try ok(uvm_ar_utimens(AT_FDCWD, cpath(full), 1_600_000_000, 0, before1970 ? -86400 : 1_600_000_000 + Int64(i) * 1000,
                              before1970 ? 0 : 123_456_789 + i, uvm_ar_AT_SYMLINK_NOFOLLOW), "utimensat")
    }
    try visit(Array(root.utf8))
}

/// A listing without sockets (which are not archived).
func listingWithoutSockets(_ root: String) throws -> [String] {
    try listing(root).filter { !$0.contains(" type=12 ") }
}
