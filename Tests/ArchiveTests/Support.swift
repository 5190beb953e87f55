import CSyscalls
import Foundation
import Glibc
import Testing

@testable import Archive

let isRoot = geteuid() == 0

/// A directory under /tmp, removed (with everything in it) when the value goes.
final class TempDir {
    let path: String
    init(_ tag: String = "t") {
        var template = Array("/tmp/uvm-archive-\(tag)-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }
    func sub(_ name: String) -> String {
        let p = path + "/" + name
        mkdir(p, 0o755)
        return p
    }
    deinit { _ = try? run(["rm", "-rf", "--one-file-system", path]) }
}

struct CommandFailed: Error, CustomStringConvertible { var description: String }

/// Runs a command; throws with its output unless it exits 0.
@discardableResult
func run(_ args: [String], cwd: String? = nil) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let out = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = String(decoding: out, as: UTF8.self)
    guard p.terminationStatus == 0 else { throw CommandFailed(description: "\(args.joined(separator: " ")): exit \(p.terminationStatus): \(text)") }
    return text
}

func cpath(_ b: [UInt8]) -> [CChar] { b.map { CChar(bitPattern: $0) } + [0] }

/// The archive TarWriter makes of `root`.
func archive(_ root: String, excluding: [String] = []) throws -> (bytes: [UInt8], stats: TarWriterStats) {
    var out: [UInt8] = []
    let w = TarWriter(bufferSize: 64 << 10) { out.append(contentsOf: $0) }
    try w.addTree(root, excluding: excluding)
    try w.finish()
    return (out, w.stats)
}

/// Extracts `bytes` into `dest`, fed in pieces of `chunk` bytes.
@discardableResult
func extract(_ bytes: [UInt8], to dest: String, chunk: Int = 1 << 20) throws -> ExtractStats {
    let x = try TarExtractor(destination: dest)
    try bytes.withUnsafeBytes { all in
        var i = 0
        while i < all.count {
            let n = min(chunk, all.count - i)
            try x.feed(UnsafeRawBufferPointer(rebasing: all[i..<(i + n)]))
            i += n
        }
    }
    return try x.finish()
}

/// One line per entry of a tree, everything that must survive a round trip: type, mode,
/// owner, size, link count and hard-link group, device numbers, symlink target, mtime to the
/// nanosecond, xattrs, and a digest of the contents. Paths are escaped bytes.
func listing(_ root: String) throws -> [String] {
    var lines: [String] = []
    var inodes: [UInt64: String] = [:]
    func esc(_ b: [UInt8]) -> String {
        b.map { $0 > 0x20 && $0 < 0x7f && $0 != 0x5C ? String(UnicodeScalar($0)) : "\\x" + String($0, radix: 16) }.joined()
    }
    func visit(_ rel: [UInt8]) throws {
        let full = Array(root.utf8) + (rel.isEmpty ? [] : [0x2F] + rel)
        var st = stat()
        guard lstat(cpath(full), &st) == 0 else { throw CommandFailed(description: "lstat \(esc(full)): \(errno)") }
        let fmt = st.st_mode & S_IFMT
        let name = rel.isEmpty ? "." : esc(rel)
        var line = "\(name) type=\(fmt >> 12) mode=\(String(st.st_mode & 0o7777, radix: 8)) owner=\(st.st_uid):\(st.st_gid)"
        line += " mtime=\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        if fmt != S_IFDIR {
            line += " size=\(st.st_size) nlink=\(st.st_nlink)"
            if st.st_nlink > 1 {
                let key = UInt64(st.st_ino)
                if inodes[key] == nil { inodes[key] = name }
                line += " group=\(inodes[key]!)"
            }
        }
        if fmt == S_IFCHR || fmt == S_IFBLK { line += " dev=\(uvm_ar_major(UInt64(st.st_rdev))),\(uvm_ar_minor(UInt64(st.st_rdev)))" }
        if fmt == S_IFLNK {
            var buf = [CChar](repeating: 0, count: 8192)
            let n = readlink(cpath(full), &buf, 8192)
            line += " -> " + esc(buf[..<max(n, 0)].map { UInt8(bitPattern: $0) })
        }
        for x in try readXattrs(fd: nil, path: full).sorted(by: { $0.name.lexicographicallyPrecedes($1.name) }) {
            line += " xattr:\(esc(x.name))=\(x.value.map { String($0, radix: 16) }.joined(separator: "."))"
        }
        if fmt == S_IFREG { line += " digest=\(try digest(full))" }
        lines.append(line)
        if fmt == S_IFDIR {
            guard let d = opendir(cpath(full)) else { throw CommandFailed(description: "opendir \(esc(full))") }
            var names: [[UInt8]] = []
            while let p = uvm_ar_readdir_name(UnsafeMutableRawPointer(d)) {
                let n = Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
                if n != [0x2E] && n != [0x2E, 0x2E] { names.append(n) }
            }
            closedir(d)
            for n in names.sorted(by: { $0.lexicographicallyPrecedes($1) }) { try visit(rel.isEmpty ? n : rel + [0x2F] + n) }
        }
    }
    try visit([])
    return lines
}

/// FNV-1a over the non-zero 64 KiB chunks and their offsets: exact for equality, and fast on
/// the zeros of a sparse gigabyte.
func digest(_ path: [UInt8]) throws -> String {
    let fd = open(cpath(path), O_RDONLY)
    guard fd >= 0 else { throw CommandFailed(description: "open: \(errno)") }
    defer { close(fd) }
    var h: UInt64 = 0xcbf29ce484222325
    var buf = [UInt8](repeating: 0, count: 64 << 10)
    var off: UInt64 = 0
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n <= 0 { break }
        if buf.withUnsafeBytes({ uvm_ar_all_zero($0.baseAddress!, n) }) == 0 {
            for b in withUnsafeBytes(of: off, Array.init) + buf[..<n] { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        }
        off += UInt64(n)
    }
    return String(h, radix: 16) + "/\(off)"
}

/// Lines that differ between two listings, for a readable failure.
func diff(_ a: [String], _ b: [String]) -> [String] {
    let sa = Set(a), sb = Set(b)
    return a.filter { !sb.contains($0) }.map { "- " + $0 } + b.filter { !sa.contains($0) }.map { "+ " + $0 }
}
