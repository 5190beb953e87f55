import CSyscalls
import Glibc

/// Runs a call that returns -1 with errno, retrying EINTR; throws "what: strerror" otherwise.
@discardableResult
func check<T: BinaryInteger>(_ what: @autoclosure () -> String, _ body: () -> T) throws -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        if errno == EINTR { continue }
        throw ArchiveError.sys(what())
    }
}

/// Calls `body` with `bytes` as a NUL-terminated C string (names may hold any byte but NUL).
func withCString<R>(_ bytes: [UInt8], _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
    var z = bytes
    z.append(0)
    return try z.withUnsafeBufferPointer { try $0.withMemoryRebound(to: CChar.self) { try body($0.baseAddress!) } }
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Writes all of `len` bytes at `offset` (pwrite until done).
func pwriteAll(_ fd: Int32, _ p: UnsafeRawPointer, _ len: Int, _ offset: Int64) throws {
    var done = 0
    while done < len {
        let n = pwrite(fd, p + done, len - done, off_t(offset + Int64(done)))
        if n < 0 {
            if errno == EINTR { continue }
            throw ArchiveError.sys("write")
        }
        done += n
    }
}

/// The extended attributes of a file: through `fd` when given, else the path (not following a
/// final symlink). Names in listing order; values are arbitrary bytes.
func readXattrs(fd: Int32?, path: [UInt8]?) throws -> [(name: [UInt8], value: [UInt8])] {
    func list(_ buf: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int {
        if let fd { return uvm_ar_flistxattr(fd, buf, size) }
        return withCString(path!) { uvm_ar_llistxattr($0, buf, size) }
    }
    func get(_ name: UnsafePointer<CChar>, _ buf: UnsafeMutableRawPointer?, _ size: Int) -> Int {
        if let fd { return uvm_ar_fgetxattr(fd, name, buf, size) }
        return withCString(path!) { uvm_ar_lgetxattr($0, name, buf, size) }
    }
    var names = [CChar]()
    while true {
        let n = list(nil, 0)
        if n < 0 {
            if errno == ENOTSUP || errno == ENODATA { return [] }
            throw ArchiveError.sys("listxattr")
        }
        if n == 0 { return [] }
        names = [CChar](repeating: 0, count: n)
        let m = names.withUnsafeMutableBufferPointer { list($0.baseAddress, n) }
        if m >= 0 { names.removeLast(n - m); break }
        if errno != ERANGE { throw ArchiveError.sys("listxattr") }  // grew in between: ask again
    }
    var out: [(name: [UInt8], value: [UInt8])] = []
    var start = 0
    for i in names.indices where names[i] == 0 {
        let name = names[start..<i].map { UInt8(bitPattern: $0) }
        start = i + 1
        if name.isEmpty { continue }
        let value: [UInt8]? = try withCString(name) { cname in
            while true {
                let n = get(cname, nil, 0)
                if n < 0 {
                    if errno == ENODATA { return nil }  // removed since the listing
                    throw ArchiveError.sys("getxattr \(display(name))")
                }
                var v = [UInt8](repeating: 0, count: n)
                let m = v.withUnsafeMutableBytes { get(cname, $0.baseAddress, n) }
                if m >= 0 { v.removeLast(n - m); return v }
                if errno != ERANGE { throw ArchiveError.sys("getxattr \(display(name))") }
            }
        }
        if let value { out.append((name, value)) }
    }
    return out
}
