import CFuse
import Glibc
import NIOConcurrencyHelpers
import NIOCore
import Plan9
import Wire

/// The file system operations, path-based (libfuse's high-level API) over 9P fids: each walks
/// from the attach fid to a fid of its own and clunks it after; open files keep theirs. Runs on
/// libfuse's threads, which block on the replies (bounded by MountLink's timeouts): never on
/// Swift's cooperative pool or an event loop.
final class MountFS: @unchecked Sendable {
    let link: MountLink
    private let lock = NIOLock()
    private var handles: [UInt64: Handle] = [:]
    private var nextHandle: UInt64 = 1
    let hostUID = getuid(), hostGID = getgid()

    struct Handle {
        let session: MountSession
        let fid: UInt32
        let ahead = ReadAhead()
    }

    /// Data read past what a sequential reader asked for. The kernel asks for 128 KiB at a time
    /// (its FUSE readahead) and each request is a round trip to the guest (milliseconds under
    /// TCG): a sequential reader gets one 9P read of up to msize instead, served from here.
    /// Dropped on any write or truncate through the handle.
    final class ReadAhead: @unchecked Sendable {
        private let lock = NIOLock()
        private var start = 0
        private var bytes: [UInt8] = []
        /// Where the last read through this handle ended.
        private var lastEnd = 0

        /// Copies [offset, offset+size) if held; the count copied, or nil.
        func take(_ offset: Int, _ size: Int, into buf: UnsafeMutablePointer<CChar>) -> Int? {
            lock.withLock {
                guard offset >= start, offset < start + bytes.count else { return nil }
                let n = min(size, start + bytes.count - offset)
                bytes.withUnsafeBytes { raw in
                    UnsafeMutableRawPointer(buf).copyMemory(from: raw.baseAddress! + (offset - start), byteCount: n)
                }
                lastEnd = offset + n
                return n
            }
        }

        /// Whether a read at `offset` continues the last one (worth reading ahead for).
        func isSequential(_ offset: Int) -> Bool { lock.withLock { offset == lastEnd } }

        func keep(_ data: ByteBuffer, at offset: Int, served: Int) {
            lock.withLock {
                lastEnd = offset + served
                start = offset
                bytes = Array(data.readableBytesView)
            }
        }

        func drop() { lock.withLock { bytes = []; start = 0 } }
    }

    init(link: MountLink) { self.link = link }

    // MARK: plumbing

    /// Whether the calling process is a uvmd: the guest looking at this mount through a share of
    /// the host folder it is in (/mnt/host/home/...), which would go round through the guest
    /// again, ever deeper, holding threads at every turn. Refused with ELOOP; cached per pid.
    private let loopCheck = NIOLock()
    private var daemonPIDs: [pid_t: Bool] = [:]

    func callerIsDaemon() -> Bool {
        guard let context = fuse_get_context() else { return false }
        let pid = context.pointee.pid
        guard pid > 0 else { return false }
        if let known = loopCheck.withLock({ daemonPIDs[pid] }) { return known }
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/\(pid)/exe", &buf, buf.count - 1)
        let exe = n > 0 ? String(cString: Array(buf[0..<n]) + [0]) : ""
        let isDaemon = exe.hasSuffix("/uvmd")
        loopCheck.withLock {
            if daemonPIDs.count > 256 { daemonPIDs.removeAll() }
            daemonPIDs[pid] = isDaemon
        }
        return isDaemon
    }

    /// Runs `body` with a live stream; errors become a negative errno for FUSE.
    func op(_ body: (MountSession) throws -> Int32) -> Int32 {
        if callerIsDaemon() { return -ELOOP }
        do {
            let s = try link.begin()
            defer { link.end() }
            return try body(s)
        } catch let e as MountError {
            return -e.errno
        } catch {
            return -EIO
        }
    }

    /// Runs `body` on an open file's stream; a file opened on a stream since closed (the VM
    /// stopped) answers EIO.
    func withHandle(_ fi: UnsafeMutablePointer<fuse_file_info>?, _ body: (Handle) throws -> Int32) -> Int32 {
        guard let fi, let h = lock.withLock({ handles[fi.pointee.fh] }) else { return -EBADF }
        guard link.isCurrent(h.session) else { return -EIO }
        do {
            return try body(h)
        } catch let e as MountError {
            return -e.errno
        } catch {
            return -EIO
        }
    }

    static func names(_ path: UnsafePointer<CChar>?) -> [P9String] {
        guard let path else { return [] }
        let bytes = Array(UnsafeBufferPointer(start: UnsafeRawPointer(path).assumingMemoryBound(to: UInt8.self), count: strlen(path)))
        return bytes.split(separator: UInt8(ascii: "/")).map { P9String(bytes: Array($0)) }
    }

    /// Parent's names and the last component.
    static func split(_ path: UnsafePointer<CChar>?) throws -> ([P9String], P9String) {
        var n = names(path)
        guard let last = n.popLast() else { throw MountError(EINVAL) }
        return (n, last)
    }

    /// A new fid for `names` below the root (no names: a clone of the root).
    func walk(_ s: MountSession, _ names: [P9String]) throws -> UInt32 {
        let fid = s.newFid()
        var from = MountSession.rootFid
        var rest = names[...]
        var created = false
        repeat {
            let chunk = Array(rest.prefix(P9.maxWalkElements))
            rest = rest.dropFirst(chunk.count)
            let reply: P9Message
            do {
                reply = try link.call(s, .twalk(fid: from, newfid: fid, names: chunk))
            } catch {
                if created { clunk(s, fid) }
                throw error
            }
            guard case .rwalk(let qids) = reply, qids.count <= chunk.count else {
                if created { clunk(s, fid) }
                throw MountError(EIO)
            }
            if qids.count < chunk.count {
                // A partial walk leaves newfid as it was: not created on the first step.
                if created { clunk(s, fid) }
                throw MountError(ENOENT)
            }
            created = true
            from = fid
        } while !rest.isEmpty
        return fid
    }

    func clunk(_ s: MountSession, _ fid: UInt32) {
        s.client.sendIgnoringReply(.tclunk(fid: fid))
    }

    func withFid<T>(_ s: MountSession, _ names: [P9String], _ body: (UInt32) throws -> T) throws -> T {
        let fid = try walk(s, names)
        defer { clunk(s, fid) }
        return try body(fid)
    }

    func addHandle(_ s: MountSession, _ fid: UInt32) -> UInt64 {
        lock.withLock {
            let h = nextHandle
            nextHandle += 1
            handles[h] = Handle(session: s, fid: fid)
            return h
        }
    }

    /// An open file keeps its stream in use until released.
    func openHandle(_ fi: UnsafeMutablePointer<fuse_file_info>?, _ body: (MountSession) throws -> UInt32) -> Int32 {
        guard let fi else { return -EINVAL }
        if callerIsDaemon() { return -ELOOP }
        do {
            let s = try link.begin()
            do {
                let fid = try body(s)
                fi.pointee.fh = addHandle(s, fid)
                return 0
            } catch {
                link.end()
                throw error
            }
        } catch let e as MountError {
            return -e.errno
        } catch {
            return -EIO
        }
    }

    func release(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let fi, let h = lock.withLock({ handles.removeValue(forKey: fi.pointee.fh) }) else { return 0 }
        if link.isCurrent(h.session) { clunk(h.session, h.fid) }
        link.end()
        return 0
    }

    // MARK: attributes

    func fill(_ st: UnsafeMutablePointer<stat>, _ a: P9Attr, _ s: MountSession) {
        var out = stat()
        out.st_ino = UInt(truncatingIfNeeded: a.qid.path)
        out.st_mode = a.mode
        out.st_nlink = UInt(truncatingIfNeeded: a.nlink)
        // The user the guest serves as is you on the host (as sshfs's idmap=user does).
        out.st_uid = a.uid == s.owner.uid ? hostUID : a.uid
        out.st_gid = a.gid == s.owner.gid ? hostGID : a.gid
        out.st_rdev = UInt(truncatingIfNeeded: a.rdev)
        out.st_size = Int(clamping: a.size)
        out.st_blksize = Int(clamping: min(a.blksize, 1 << 20))
        out.st_blocks = Int(clamping: a.blocks)
        out.st_atim = Self.time(a.atimeSec, a.atimeNsec)
        out.st_mtim = Self.time(a.mtimeSec, a.mtimeNsec)
        out.st_ctim = Self.time(a.ctimeSec, a.ctimeNsec)
        st.pointee = out
    }

    static func time(_ sec: UInt64, _ nsec: UInt64) -> timespec {
        timespec(tv_sec: Int(truncatingIfNeeded: sec), tv_nsec: Int(min(nsec, 999_999_999)))
    }

    func getattr(_ s: MountSession, fid: UInt32, into st: UnsafeMutablePointer<stat>) throws -> Int32 {
        guard case .rgetattr(let a) = try link.call(s, .tgetattr(fid: fid, mask: P9.GetattrMask.basic)) else { throw MountError(EIO) }
        fill(st, a, s)
        return 0
    }

    func setattr(path: UnsafePointer<CChar>?, fi: UnsafeMutablePointer<fuse_file_info>?, _ attr: P9SetAttr) -> Int32 {
        if let fi, fi.pointee.fh != 0 {
            return withHandle(fi) { h in
                h.ahead.drop()
                guard case .rsetattr = try link.call(h.session, .tsetattr(fid: h.fid, attr: attr)) else { throw MountError(EIO) }
                return 0
            }
        }
        return op { s in
            try withFid(s, Self.names(path)) { fid in
                guard case .rsetattr = try link.call(s, .tsetattr(fid: fid, attr: attr)) else { throw MountError(EIO) }
                return 0
            }
        }
    }

    /// Host open(2) flags to 9P's (the same numbers on Linux, spelled out).
    static func openFlags(_ flags: Int32) -> UInt32 {
        var f = UInt32(flags & O_ACCMODE)
        if flags & O_TRUNC != 0 { f |= P9.OpenFlags.trunc }
        if flags & O_APPEND != 0 { f |= P9.OpenFlags.append }
        if flags & O_SYNC == O_SYNC { f |= P9.OpenFlags.sync } else if flags & O_DSYNC != 0 { f |= P9.OpenFlags.dsync }
        return f
    }

    // MARK: data

    func read(_ h: Handle, into buf: UnsafeMutablePointer<CChar>, size: Int, offset: Int) throws -> Int32 {
        if let n = h.ahead.take(offset, size, into: buf) {
            if n == size { return Int32(n) }
            // The rest continues where the held data ended: read ahead again from there.
            return Int32(n) + (try read(h, into: buf + n, size: size - n, offset: offset + n))
        }
        let chunk = h.session.msize - P9.ioHeaderSize
        if size < chunk, h.ahead.isSequential(offset) {
            // One read of up to msize: what the caller asked for now, the rest kept for next.
            let want = min(chunk, 1 << 20)
            guard case .rread(let data) = try link.call(h.session, .tread(fid: h.fid, offset: UInt64(offset), count: UInt32(want))),
                  data.readableBytes <= want else { throw MountError(EIO) }
            let n = min(size, data.readableBytes)
            data.withUnsafeReadableBytes { raw in
                if n > 0 { UnsafeMutableRawPointer(buf).copyMemory(from: raw.baseAddress!, byteCount: n) }
            }
            h.ahead.keep(data, at: offset, served: n)
            return Int32(n)
        }
        var done = 0
        while done < size {
            let want = min(size - done, chunk)
            guard case .rread(let data) = try link.call(h.session, .tread(fid: h.fid, offset: UInt64(offset + done), count: UInt32(want))),
                  data.readableBytes <= want else { throw MountError(EIO) }
            data.withUnsafeReadableBytes { raw in
                if raw.count > 0 { (UnsafeMutableRawPointer(buf) + done).copyMemory(from: raw.baseAddress!, byteCount: raw.count) }
            }
            done += data.readableBytes
            if data.readableBytes < want { break }
        }
        h.ahead.keep(ByteBuffer(), at: offset + done, served: 0)
        return Int32(done)
    }

    func write(_ h: Handle, from buf: UnsafePointer<CChar>, size: Int, offset: Int) throws -> Int32 {
        h.ahead.drop()
        var done = 0
        // Even pieces: a 1 MiB write in msize-24 pieces would take a second round trip for 24 bytes.
        let most = h.session.msize - P9.ioHeaderSize
        let pieces = max(1, (size + most - 1) / most)
        let chunk = (size + pieces - 1) / pieces
        while done < size {
            let n = min(size - done, chunk)
            let data = ByteBuffer(bytes: UnsafeRawBufferPointer(start: UnsafeRawPointer(buf) + done, count: n))
            guard case .rwrite(let count) = try link.call(h.session, .twrite(fid: h.fid, offset: UInt64(offset + done), data: data)),
                  count <= UInt32(n) else { throw MountError(EIO) }
            done += Int(count)
            if count == 0 { break }
        }
        return Int32(done)
    }

    // MARK: directories

    static func modeFromDirentType(_ t: UInt8) -> mode_t {
        mode_t(t) << 12
    }

    func readdir(_ h: Handle, buf: UnsafeMutableRawPointer?, filler: fuse_fill_dir_t?, offset: Int) throws -> Int32 {
        guard let filler else { return -EINVAL }
        var cookie = UInt64(bitPattern: Int64(offset))
        let count = UInt32(min(h.session.msize - P9.ioHeaderSize, 64 << 10))
        while true {
            guard case .rreaddir(let data) = try link.call(h.session, .treaddir(fid: h.fid, offset: cookie, count: count)),
                  data.readableBytes <= Int(count) else { throw MountError(EIO) }
            guard let entries = try? P9DirEntry.parse(data) else { throw MountError(EIO) }
            if entries.isEmpty { return 0 }
            for e in entries {
                // Names from the guest: one component each, or not shown.
                let name = e.name.bytes
                guard !name.isEmpty, name.count <= 255, !name.contains(0), !name.contains(UInt8(ascii: "/")) else { continue }
                var st = stat()
                st.st_ino = UInt(truncatingIfNeeded: e.qid.path)
                st.st_mode = Self.modeFromDirentType(e.type)
                let full = (name + [0]).withUnsafeBufferPointer { p in
                    p.withMemoryRebound(to: CChar.self) { filler(buf, $0.baseAddress, &st, off_t(bitPattern: e.offset), fuse_fill_dir_flags(0)) }
                }
                if full != 0 { return 0 }
                cookie = e.offset
            }
        }
    }
}

extension off_t {
    init(bitPattern u: UInt64) { self = off_t(Int64(bitPattern: u)) }
}
