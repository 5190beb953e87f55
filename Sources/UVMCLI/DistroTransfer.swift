#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import CSyscalls
import Glibc
import NIOCore
import Settings
import Wire

/// Tar streams between a file (or stdin/stdout) and uvmd: decompressed or compressed here, with
/// the host's own tools, so that uvmd and the guest only ever see plain tar.
enum DistroTransfer {
    /// Compressions recognised by their first bytes, and the tool that undoes each.
    static let decompressors: [(magic: [UInt8], argv: [String], name: String)] = [
        ([0x1f, 0x8b], ["gzip", "-dc"], "gzip"),
        ([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], ["xz", "-dc"], "xz"),
        ([0x28, 0xb5, 0x2f, 0xfd], ["zstd", "-dcq"], "zstd"),
        ([0x42, 0x5a, 0x68], ["bzip2", "-dc"], "bzip2"),
    ]

    static func importTarball(file: String, request: ImportRequest) throws -> DistroInfo {
        signal(SIGPIPE, SIG_IGN)
        let input: Int32
        if file == "-" {
            input = 0
        } else {
            input = open(file, O_RDONLY | O_CLOEXEC)
            guard input >= 0 else { throw CLIError("cannot read \(file): \(String(cString: strerror(errno)))") }
        }
        var st = stat()
        let total: UInt64? = file != "-" && fstat(input, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG ? UInt64(st.st_size) : nil
        // The first bytes say the compression; they are passed on ahead of the rest.
        var head = [UInt8](repeating: 0, count: 512)
        var got = 0
        while got < head.count {
            let n = read(input, &head[got], head.count - got)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += n
        }
        head.removeLast(head.count - got)
        guard got > 0 else { throw CLIError("\(file == "-" ? "stdin" : file) is empty: expected a root file system tarball") }
        let tool = decompressors.first { got >= $0.magic.count && Array(head.prefix($0.magic.count)) == $0.magic }
        // Plain tar: "ustar" at offset 257.
        if tool == nil && !(got >= 262 && Array(head[257..<262]) == Array("ustar".utf8)) {
            throw CLIError("\(file == "-" ? "stdin" : file) is not a tarball (tar, tar.gz, tar.xz, tar.zst or tar.bz2)")
        }

        // The tar stream: straight from the input, or from the decompressor fed by a thread.
        var tarFD = input
        var decompressor: pid_t = 0
        if let tool {
            var toTool: [Int32] = [-1, -1], fromTool: [Int32] = [-1, -1]
            guard uvm_pipe_cloexec(&toTool) == 0, uvm_pipe_cloexec(&fromTool) == 0 else { throw CLIError("pipe: \(String(cString: strerror(errno)))") }
            guard let path = findTool(tool.argv[0]) else { throw CLIError("\(tool.argv[0]) is not installed: it is needed to read a \(tool.name)-compressed tarball") }
            let argv: [UnsafeMutablePointer<CChar>?] = tool.argv.map { strdup($0) } + [nil]
            defer { argv.forEach { free($0) } }
            decompressor = uvm_spawn_with_fds(path, argv, toTool[0], fromTool[1], 2)
            close(toTool[0]); close(fromTool[1])
            guard decompressor > 0 else { throw CLIError("cannot run \(path): \(String(cString: strerror(errno)))") }
            let feed = toTool[1], source = input, first = head
            startThread {
                _ = first.withUnsafeBytes { writeFully(feed, $0) }
                var buf = [UInt8](repeating: 0, count: 256 << 10)
                while true {
                    let n = read(source, &buf, buf.count)
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 || !buf[0..<n].withUnsafeBytes({ writeFully(feed, $0) }) { break }
                }
                close(feed)
            }
            tarFD = fromTool[0]
            head = []
        }

        let paths = Paths.current()
        let name = file == "-" ? "stdin" : file
        let spool = try spoolTar(head: head, from: tarFD, decompressor: decompressor, name: name, total: total, paths: paths)
        var handedOver = false
        defer { if !handedOver { unlink(spool) } }
        let conn = try DaemonConnection.connectOrLaunch(paths: paths)
        var request = request
        request.spool = spool
        try conn.send(.json(.request, request.request))
        // uvmd deletes the spool file from here on, however the import ends.
        handedOver = true
        return try awaitImport(conn, paths: paths)
    }

    /// `uvm install` of a recipe's ext4 image: uvmd copies it; the VM adds the default user.
    static func installImage(_ image: String, request: ImportRequest) throws -> DistroInfo {
        let paths = Paths.current()
        let conn = try DaemonConnection.connectOrLaunch(paths: paths)
        var request = request
        request.image = image
        try conn.send(.json(.request, request.request))
        return try awaitImport(conn, paths: paths)
    }

    private static func awaitImport(_ conn: DaemonConnection, paths: Paths) throws -> DistroInfo {
        let showProgress = isatty(2) == 1
        while let frame = try conn.receive() {
            switch frame.kind {
            case .progress: if showProgress { writeAll(2, frame.payload, newline: true) }
            case .response: return try frame.decode(DistroInfo.self)
            case .error: throw CLIError(try frame.decode(WireError.self).message)
            default: continue
            }
        }
        throw CLIError("uvmd closed the connection during the import (see \(paths.daemonLog))")
    }

    /// Writes the plain tar (`head`, then `fd` to its end) to a new file in uvmd's spool folder,
    /// padded to whole 512-byte sectors (the guest reads it as a disk), and returns its path. A
    /// failed decompressor (a corrupt or truncated file) or a full disk leaves no file behind.
    static func spoolTar(head: [UInt8], from fd: Int32, decompressor: pid_t, name: String, total: UInt64?, paths: Paths) throws -> String {
        guard let (out, path) = paths.createSpoolFile(.import) else {
            throw CLIError("cannot write to \(paths.spoolDir): \(String(cString: strerror(errno)))")
        }
        var ok = false
        defer {
            close(out)
            if !ok { unlink(path) }
        }
        func fail(_ what: String) -> CLIError {
            if errno == ENOSPC || errno == EDQUOT {
                return CLIError("the disk holding \(paths.spoolDir) is full: an import needs room there for the whole uncompressed tarball for a moment (free some space and import again)")
            }
            return CLIError("\(what): \(String(cString: strerror(errno)))")
        }
        let showProgress = isatty(2) == 1
        var written: UInt64 = 0
        var lastReport = ContinuousClock.now
        func put(_ bytes: UnsafeRawBufferPointer) throws {
            guard writeFully(out, bytes) else { throw fail("cannot write \(path)") }
            written += UInt64(bytes.count)
            if showProgress, ContinuousClock.now - lastReport > .seconds(1) {
                lastReport = .now
                let of = total.map { decompressor == 0 ? " of \($0 >> 20) MiB" : " (from \($0 >> 20) MiB compressed)" } ?? ""
                printError("uvm: read \(written >> 20) MiB\(of) from \(name)")
            }
        }
        if !head.isEmpty { try head.withUnsafeBytes { try put($0) } }
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n < 0 {
                let e = fail("reading \(name)")
                if decompressor > 0 { kill(decompressor, SIGTERM); var s: Int32 = 0; waitpid(decompressor, &s, 0) }
                throw e
            }
            if n == 0 { break }
            try buf.withUnsafeBytes { try put(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        if fd != 0 { close(fd) }
        // A decompressor that failed (a corrupt or truncated file) must not pass for the end.
        if decompressor > 0 {
            var status: Int32 = 0
            while waitpid(decompressor, &status, 0) < 0 && errno == EINTR {}
            guard status == 0 else { throw CLIError("\(name) is corrupt or truncated (the decompressor failed; see above)") }
        }
        guard written > 0 else { throw CLIError("\(name) holds no tar data: expected a root file system tarball") }
        let padded = (written + 511) / 512 * 512
        // No fsync: QEMU reads it through the same page cache.
        guard ftruncate(out, off_t(padded)) == 0 else { throw fail("cannot write \(path)") }
        ok = true
        return path
    }

    static func export(name: String, file: String, compressor: [String]?) throws -> ExportResult {
        signal(SIGPIPE, SIG_IGN)
        var output: Int32 = 1
        let partial = file == "-" ? nil : file + ".partial"
        if let partial {
            output = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard output >= 0 else { throw CLIError("cannot write \(partial): \(String(cString: strerror(errno)))") }
        }
        var sink = output
        var tool: pid_t = 0
        if let compressor {
            guard let path = findTool(compressor[0]) else { throw CLIError("\(compressor[0]) is not installed: it is needed to write that format") }
            var fds: [Int32] = [-1, -1]
            guard uvm_pipe_cloexec(&fds) == 0 else { throw CLIError("pipe: \(String(cString: strerror(errno)))") }
            let argv: [UnsafeMutablePointer<CChar>?] = compressor.map { strdup($0) } + [nil]
            defer { argv.forEach { free($0) } }
            tool = uvm_spawn_with_fds(path, argv, fds[0], output, 2)
            close(fds[0])
            guard tool > 0 else { throw CLIError("cannot run \(path): \(String(cString: strerror(errno)))") }
            sink = fds[1]
        }
        func fail(_ message: String) -> CLIError {
            if sink != output { close(sink) }
            if tool > 0 { var s: Int32 = 0; waitpid(tool, &s, 0) }
            if let partial { unlink(partial) }
            return CLIError(message)
        }
        let paths = Paths.current()
        let conn = try DaemonConnection.connectOrLaunch(paths: paths)
        try conn.send(.json(.request, ExportRequest(name: name).request))
        while let frame = try conn.receive() {
            switch frame.kind {
            case .stdout:
                guard writeAll(sink, frame.payload) else { throw fail("cannot write \(file == "-" ? "stdout" : file): \(String(cString: strerror(errno)))") }
            case .progress:
                if isatty(2) == 1 { writeAll(2, frame.payload, newline: true) }
            case .response:
                let result = try frame.decode(ExportResult.self)
                if sink != output { close(sink) }
                if tool > 0 {
                    var status: Int32 = 0
                    while waitpid(tool, &status, 0) < 0 && errno == EINTR {}
                    guard status == 0 else { throw fail("\(compressor![0]) failed (status \(status))") }
                }
                if let partial {
                    guard fsync(output) == 0, rename(partial, file) == 0 else { throw fail("cannot write \(file): \(String(cString: strerror(errno)))") }
                    close(output)
                }
                return result
            case .error:
                throw fail(try frame.decode(WireError.self).message)
            default:
                continue
            }
        }
        throw fail("uvmd closed the connection during the export (see \(paths.daemonLog))")
    }

    static func findTool(_ name: String) -> String? {
        ["/usr/bin/", "/bin/", "/usr/local/bin/"].map { $0 + name }.first { access($0, X_OK) == 0 }
    }

    static func writeFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = write(fd, bytes.baseAddress! + off, bytes.count - off)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            off += n
        }
        return true
    }
}
