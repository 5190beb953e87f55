import CSyscalls
import Glibc

/// What os-release says about a distribution.
public struct OSRelease: Sendable, Equatable {
    public var prettyName: String?
    public var id: String?
    public var versionID: String?

    public init(prettyName: String? = nil, id: String? = nil, versionID: String? = nil) {
        self.prettyName = prettyName
        self.id = id
        self.versionID = versionID
    }

    /// Parses os-release(5): KEY=VALUE lines, values optionally quoted with shell-style escapes.
    public init(parsing text: String) {
        for raw in text.split(separator: "\n") {
            let line = raw.drop { $0 == " " || $0 == "\t" }
            guard !line.hasPrefix("#"), let eq = line.firstIndex(of: "=") else { continue }
            let key = String(line[..<eq])
            var value = Substring(line[line.index(after: eq)...])
            while value.last == " " || value.last == "\t" || value.last == "\r" { value.removeLast() }
            var out = ""
            if let q = value.first, q == "\"" || q == "'" {
                var escaped = false
                for ch in value.dropFirst() {
                    if escaped { out.append(ch); escaped = false } else if ch == "\\" && q == "\"" { escaped = true } else if ch == q { break } else { out.append(ch) }
                }
            } else {
                out = String(value)
            }
            switch key {
            case "PRETTY_NAME": prettyName = out
            case "ID": id = out
            case "VERSION_ID": versionID = out
            default: break
            }
        }
    }
}

/// Checks that `path` holds a root file system: `bin/sh` exists (a symlink is fine, e.g. to
/// busybox; `bin` itself may be a symlink to usr/bin) and os-release is in etc/ or usr/lib/.
/// Symlinks are resolved as if `path` were `/`, never outside it. Returns os-release's fields;
/// throws an ArchiveError saying what is missing.
public func inspectRootFS(at path: String) throws -> OSRelease {
    let root = try check("open \(path)") { uvm_ar_openat(AT_FDCWD, path, O_RDONLY | uvm_ar_O_DIRECTORY | uvm_ar_O_CLOEXEC, 0) }
    defer { close(root) }
    guard resolveInRoot(root, Array("bin/sh".utf8), followFinal: false) != nil else {
        throw ArchiveError("not a root file system: it has no bin/sh")
    }
    for candidate in ["etc/os-release", "usr/lib/os-release"] {
        guard let comps = resolveInRoot(root, Array(candidate.utf8), followFinal: true), !comps.isEmpty else { continue }
        let rel = Array(comps.joined(separator: [0x2F]))
        let fd = withCString(rel) { uvm_ar_openat(root, $0, O_RDONLY | uvm_ar_O_NOFOLLOW | uvm_ar_O_CLOEXEC, 0) }
        guard fd >= 0 else { continue }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { continue }
        var text = [UInt8](repeating: 0, count: 64 << 10)  // os-release is a few hundred bytes
        var got = 0
        while got < text.count {
            let n = text.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += n
        }
        return OSRelease(parsing: String(decoding: text[..<got], as: UTF8.self))
    }
    throw ArchiveError("not a root file system: it has neither etc/os-release nor usr/lib/os-release")
}

/// Resolves `path` beneath `root` as a chroot would (absolute symlinks start again at root, ".."
/// stops at it). Returns the components of what it names, or nil if it does not exist.
func resolveInRoot(_ root: Int32, _ path: [UInt8], followFinal: Bool) -> [[UInt8]]? {
    func split(_ p: [UInt8]) -> [[UInt8]] { p.split(separator: 0x2F).map(Array.init) }
    var todo = Array(split(path).reversed())
    var resolved: [[UInt8]] = []
    var hops = 0
    while let c = todo.popLast() {
        if c == [0x2E] { continue }
        if c == [0x2E, 0x2E] {
            _ = resolved.popLast()
            continue
        }
        let candidate = resolved + [c]
        let rel = Array(candidate.joined(separator: [0x2F]))
        var st = stat()
        guard withCString(rel, { fstatat(root, $0, &st, uvm_ar_AT_SYMLINK_NOFOLLOW) }) == 0 else { return nil }
        if st.st_mode & S_IFMT == S_IFLNK && (!todo.isEmpty || followFinal) {
            hops += 1
            guard hops <= 40 else { return nil }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = withCString(rel) { r in buf.withUnsafeMutableBytes { readlinkat(root, r, $0.baseAddress!.assumingMemoryBound(to: CChar.self), 4096) } }
            guard n > 0 else { return nil }
            let target = Array(buf[..<n])
            if target.first == 0x2F { resolved = [] }
            todo += split(target).reversed()
        } else {
            resolved = candidate
        }
    }
    return resolved
}
