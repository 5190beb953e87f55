import CPlan9
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The inode a fid names (an cp9_O_PATH fd), plus the directory fd and name it was reached by, which
/// only the legacy Trename/Tremove need (they name a file by fid alone).
final class Node: Sendable {
    let fd: HostFD
    /// Also what the session's node cache is keyed by: a walk to a name of this directory that
    /// still finds the same inode shares this node, and its descriptor.
    let parent: HostFD?
    let name: [UInt8]
    let dev: UInt64
    let ino: UInt64
    let mode: UInt32
    /// The directory it was reached from, when known: change notes about this node's attributes
    /// are reported there (and the guest's own changes to them are not echoed back).
    let parentKey: ChangeWatcher.DirKey?

    init(fd: HostFD, parent: HostFD?, name: [UInt8], stat st: HostStat, parentKey: ChangeWatcher.DirKey? = nil) {
        self.fd = fd
        self.parent = parent
        self.parentKey = parentKey
        self.name = name
        self.dev = st.dev
        self.ino = st.ino
        self.mode = st.mode
    }

    var type: FileType? { FileType(mode: mode) }
    var key: ChangeWatcher.DirKey { ChangeWatcher.DirKey(dev: dev, ino: ino) }
    func isSame(_ st: HostStat) -> Bool { st.dev == dev && st.ino == ino }
}

enum OpenState {
    case none
    case file(HostFD, writable: Bool)
    case dir(HostFD)
    /// Txattrwalk result: the value (or the name list) the client reads with Tread. The lease
    /// holds its size against the session's xattr budget while the fid keeps it.
    case xattrRead([UInt8], Lease)
    /// Txattrcreate: the client writes the value with Twrite; it is set on Tclunk. The declared
    /// size is held against the session's xattr budget from Txattrcreate on.
    case xattrWrite(name: String, size: Int, flags: Int32, value: [UInt8], Lease)
}

/// What one session may hold at once. Going over a limit is an error to that session alone; the
/// byte and request limits make the server stop reading from it instead.
struct SessionLimits: Sendable {
    /// Fids (EMFILE): each costs memory, not a descriptor.
    var fids = 65536
    /// Host descriptors (EMFILE); all sessions together also stay within Budget.processDescriptors.
    var descriptors = 4096
    /// Xattr values held between Txattrcreate and Tclunk, or Txattrwalk and Tclunk (ENOMEM).
    var xattrBytes = 8 << 20
    /// Replies being made (Tread/Treaddir counts) or written and not yet sent: above this the
    /// session is not read from until some are sent.
    var replyBytes = 16 << 20
    /// Requests in flight before the session is not read from.
    var inflight = 1024
    /// Requests of one session on the thread pool at once; the rest wait their turn, so one
    /// session's slow or numerous requests leave threads for the others.
    var running = 8
    /// Directories of the export watched for change notes (all sessions together): each costs
    /// the kernel about 1 KiB. Past it, directories are announced as uncached.
    var watchedDirectories = 32768
}

extension NIOLock {
    /// withLock for typed throws (NIOLock's own is rethrows, which widens to any Error).
    func withLockTyped<T>(_ body: () throws(P9Errno) -> T) throws(P9Errno) -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

final class Fid: @unchecked Sendable {
    /// Guards `node` and `state`; also held across lseek+getdents so that two Treaddir on one fid
    /// do not interleave.
    let lock = NIOLock()
    var node: Node
    var state: OpenState = .none
    /// The guest user of the attach (n_uname): the owner recorded for new files in metadata mode.
    let uid: UInt32

    init(node: Node, uid: UInt32) {
        self.node = node
        self.uid = uid
    }

    var snapshot: (Node, OpenState) { lock.withLock { (node, state) } }
}

/// Guest ownership and mode kept in a user xattr (WSL's "metadata" mount option), so that chown and
/// chmod in the guest persist without privileges on the host. Also emulates device nodes, FIFOs and
/// sockets that the guest creates: on the host they are empty regular files.
struct GuestMetadata: Equatable {
    static let xattrName = "user.uvm.stat"
    /// Never readable or writable by the guest: a guest that could write it could make itself a
    /// setuid-root file.
    static let reservedPrefix = "user.uvm."

    var uid: UInt32
    var gid: UInt32
    var mode: UInt32
    var rdev: UInt64

    init(uid: UInt32, gid: UInt32, mode: UInt32, rdev: UInt64) {
        self.uid = uid
        self.gid = gid
        self.mode = mode
        self.rdev = rdev
    }

    /// "uid gid mode rdev" in decimal: readable with getfattr, trivially parsed.
    init?(bytes: [UInt8]) {
        let parts = bytes.split(separator: UInt8(ascii: " ")).map { String(decoding: $0, as: UTF8.self) }
        guard parts.count == 4, let u = UInt32(parts[0]), let g = UInt32(parts[1]), let m = UInt32(parts[2]),
              let r = UInt64(parts[3]) else { return nil }
        self.init(uid: u, gid: g, mode: m, rdev: r)
    }

    var bytes: [UInt8] { Array("\(uid) \(gid) \(mode) \(rdev)".utf8) }

    /// What the guest sees a host inode of type `host` as: a regular file on the host stands for
    /// a special file or a symlink the guest made; a record never turns a host directory, or a
    /// host regular file into a directory, or anything into what the host would act on.
    func guestType(host: FileType) -> FileType {
        guard host == .reg, let t = FileType(mode: mode), [.chr, .blk, .fifo, .sock, .lnk].contains(t) else { return host }
        return t
    }
}

/// What all sessions of one server share.
final class ExportCore: Sendable {
    let export: Plan9Export
    let root: HostFD
    let rootStat: HostStat
    let qids: QidMapper
    let umask: UInt32
    let euid: UInt32

    init(export: Plan9Export) throws(P9Errno) {
        self.export = export
        root = try HostFS.openDirectory(path: export.root)
        rootStat = try HostFS.stat(root)
        qids = QidMapper(rootDev: rootStat.dev)
        umask = ExportCore.readUmask()
        euid = geteuid()
    }

    func isRoot(_ st: HostStat) -> Bool { st.dev == rootStat.dev && st.ino == rootStat.ino }
    func isRoot(_ node: Node) -> Bool { node.dev == rootStat.dev && node.ino == rootStat.ino }

    var rootNode: Node { Node(fd: root, parent: nil, name: [], stat: rootStat) }

    /// The export's change watcher while any session wants changes pushed (cache=meta guests).
    private let watcher = NIOLockedValueBox<ChangeWatcher?>(nil)

    func subscribeChanges(_ id: ObjectIdentifier, logger: Logger, maxWatches: Int,
                          _ deliver: @escaping @Sendable ([P9Note]) -> Void) throws(P9Errno) -> ChangeWatcher {
        var failure: P9Errno?
        let made = watcher.withLockedValue { w -> ChangeWatcher? in
            if let w { return w }
            do throws(P9Errno) {
                w = try ChangeWatcher(qids: qids, logger: logger, maxWatches: maxWatches)
            } catch {
                failure = error
            }
            return w
        }
        guard let w = made else { throw failure ?? P9Errno(EIO) }
        w.subscribe(id, deliver)
        w.watch(rootNode)
        return w
    }

    var hasChangeWatcher: Bool { watcher.withLockedValue { $0 != nil } }

    func unsubscribeChanges(_ id: ObjectIdentifier) {
        watcher.withLockedValue { w in
            if let current = w, current.unsubscribe(id) {
                current.stop()
                w = nil
            }
        }
    }

    /// The process umask without the race of umask(2)'s set-and-restore (other threads create files).
    private static func readUmask() -> UInt32 {
        let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0o022 }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = read(fd, &buf, buf.count)
        guard n > 0 else { return 0o022 }
        for line in buf[0..<n].split(separator: UInt8(ascii: "\n")) {
            let s = String(decoding: line, as: UTF8.self)
            if s.hasPrefix("Umask:"), let v = UInt32(s.dropFirst(6).trimmingCharacters(), radix: 8) { return v }
        }
        return 0o022
    }
}

extension Substring {
    fileprivate func trimmingCharacters() -> String {
        String(self.drop(while: { $0 == " " || $0 == "\t" }))
    }
}

/// One 9P session: the fid table and every operation, synchronous. The channel handler runs these
/// on a thread pool; the fuzzer runs them directly.
final class Plan9Session: @unchecked Sendable {
    let core: ExportCore
    private let lock = NIOLock()
    private var fids: [UInt32: Fid] = [:]
    private var _msize: UInt32 = P9.minMsize
    /// Bumped by Tversion and close: a request from before that finishes afterwards must not
    /// install fids into the new session.
    private var generation = 0
    private let allocator = ByteBufferAllocator()
    private let limits: SessionLimits
    /// The session's own host descriptors (node cache and open files), within the process's.
    let descriptors: Budget
    let xattrBytes: Budget
    /// Nodes walked to, by (parent directory descriptor, name): fids walked to the same file share
    /// one descriptor instead of pinning one each. Weak: a node lives as long as fids use it.
    private var nodes: [NodeKey: WeakNode] = [:]
    private var nodesAtSweep = 0

    private struct NodeKey: Hashable {
        let parent: ObjectIdentifier
        let name: [UInt8]
    }

    private struct WeakNode {
        weak var node: Node?
    }

    /// The guest's RAM when its transport sends zero-copy requests (P9ZeroCopy.swift), else nil.
    let memory: GuestMemory?

    /// Starts the host's write-out of large writes (nil: left to the page cache).
    let writeBehind: WriteBehind?

    init(core: ExportCore, limits: SessionLimits = SessionLimits(), memory: GuestMemory? = nil,
         writeBehind: WriteBehind? = nil) {
        self.core = core
        self.limits = limits
        self.memory = memory
        self.writeBehind = writeBehind
        let process = Budget.processDescriptors
        descriptors = Budget(limit: min(limits.descriptors, max(16, process.limit / 4)), error: EMFILE, parent: process)
        xattrBytes = Budget(limit: limits.xattrBytes, error: ENOMEM)
    }

    var msize: UInt32 { lock.withLock { _msize } }
    /// Zero copy carries 1 MiB of data per Tread/Twrite: the message header needs room beyond it.
    var maxMsize: UInt32 { memory == nil ? P9.maxMsize : P9.zeroCopyMaxMsize }
    var fidCount: Int { lock.withLock { fids.count } }
    var export: Plan9Export { core.export }

    /// Tversion: negotiates msize and starts afresh (all fids clunked).
    func version(msize: UInt32, version: P9String) -> P9Message {
        _ = takeFids()  // released outside the lock
        guard version.bytes.starts(with: Array(P9.version.utf8)), msize >= P9.minMsize else {
            return .rversion(msize: min(msize, maxMsize), version: "unknown")
        }
        let m = min(msize, maxMsize)
        lock.withLock { _msize = m }
        return .rversion(msize: m, version: P9String(P9.version))
    }

    /// Ends the session: every fid is released. Pending xattr writes are dropped.
    var currentGeneration: Int { lock.withLock { generation } }

    /// Set while the client has asked for change notes (Tuvmnotify): directories it looks names
    /// up in are watched, and the changes its own requests make are not echoed back to it.
    let changes = NIOLockedValueBox<ChangeWatcher?>(nil)

    /// Runs a request that changes the attributes (or data) of fid `fid`'s file, telling the
    /// watcher so that the guest, which refetches them itself, is not told of it again.
    private func touching<T>(_ fid: UInt32, _ body: () throws(P9Errno) -> T) throws(P9Errno) -> T {
        guard let w = changes.withLockedValue({ $0 }), let f = lock.withLock({ fids[fid] }) else { return try body() }
        let node = f.snapshot.0
        guard let dir = node.parentKey, !node.name.isEmpty else { return try body() }
        w.expectAttributes(in: dir, node.name, done: false)
        defer { w.expectAttributes(in: dir, node.name, done: true) }
        return try body()
    }

    /// Runs a request that creates, removes or renames `name` in directory fid `dirfid`, telling
    /// the watcher to expect the event it causes (and the attribute events after a create), and,
    /// with `watch`, to watch the directory first if it does not yet.
    private func expecting<T>(_ dirfid: UInt32, _ name: [UInt8], attributes: Bool = true, watch: Bool = false,
                              _ body: () throws(P9Errno) -> T) throws(P9Errno) -> T {
        guard let w = changes.withLockedValue({ $0 }), let f = lock.withLock({ fids[dirfid] }) else { return try body() }
        let dir = f.snapshot.0
        guard dir.type == .dir else { return try body() }
        if watch { w.watch(dir) }
        w.expectEntry(in: dir, name)
        if attributes { w.expectAttributes(in: dir.key, name, done: false) }
        defer { if attributes { w.expectAttributes(in: dir.key, name, done: true) } }
        do throws(P9Errno) {
            return try body()
        } catch {
            w.unexpectEntry(in: dir, name)
            throw error
        }
    }

    func close() {
        _ = takeFids()
    }

    /// Empties the fid table, for the caller to release where closing descriptors may block.
    func takeFids() -> [UInt32: Fid] {
        lock.withLock {
            let old = fids
            fids = [:]
            generation += 1
            return old
        }
    }

    /// `generation`: the session generation the request arrived in (nil: the current one).
    func handle(_ message: P9Message, generation: Int? = nil) -> P9Message {
        do throws(P9Errno) {
            return try dispatch(message, generation ?? currentGeneration)
        } catch {
            return .rlerror(ecode: UInt32(bitPattern: error.code))
        }
    }

    private func dispatch(_ message: P9Message, _ gen: Int) throws(P9Errno) -> P9Message {
        switch message {
        case let .tattach(fid, afid, _, _, nUname):
            return try attach(fid: fid, afid: afid, nUname: nUname, gen)
        case let .twalk(fid, newfid, names):
            return try walk(fid: fid, newfid: newfid, names: names, gen)
        case let .tgetattr(fid, mask):
            return .rgetattr(try getattr(fid: fid, mask: mask))
        case let .tsetattr(fid, attr):
            try touching(fid) { () throws(P9Errno) in try setattr(fid: fid, attr) }
            return .rsetattr
        case let .tuvmsetattr(fid, attr):
            try touching(fid) { () throws(P9Errno) in try setattr(fid: fid, attr) }
            return .ruvmsetattr(try getattr(fid: fid, mask: P9.GetattrMask.all))
        case let .tlopen(fid, flags):
            return try lopen(fid: fid, flags: flags)
        case let .tlcreate(fid, name, flags, mode, gid):
            return try expecting(fid, name.bytes) { () throws(P9Errno) in
                try lcreate(fid: fid, name: name.bytes, flags: flags, mode: mode, gid: gid)
            }
        case let .tuvmlcreate(dfid, ofid, pfid, name, flags, mode, gid):
            // A cache=meta guest creates a name it has not looked up without a walk first, and
            // then caches it: host changes in this directory must reach it all the same.
            return try expecting(dfid, name.bytes, watch: true) { () throws(P9Errno) in
                try lcreateBinding(dfid: dfid, ofid: ofid, pfid: pfid, name: name.bytes, flags: flags, mode: mode, gid: gid, gen)
            }
        case let .tread(fid, offset, count):
            return .rread(data: try read(fid: fid, offset: offset, count: count))
        case let .twrite(fid, offset, data):
            return .rwrite(count: try touching(fid) { () throws(P9Errno) in try write(fid: fid, offset: offset, data: data) })
        case let .treaddir(fid, offset, count):
            return .rreaddir(data: try readdir(fid: fid, offset: offset, count: count))
        case let .tclunk(fid):
            try clunkRequest(fid)
            return .rclunk
        case let .tuvmclunk(fids):
            var first: P9Errno?
            for fid in fids {
                do throws(P9Errno) { try clunkRequest(fid) } catch { first = first ?? error }
            }
            if let first { throw first }
            return .ruvmclunk
        case let .tremove(fid):
            try remove(fid: fid)
            return .rremove
        case let .tstatfs(fid):
            return .rstatfs(try statfs(fid: fid))
        case let .tmkdir(dfid, name, mode, gid):
            return .rmkdir(qid: try expecting(dfid, name.bytes) { () throws(P9Errno) in
                try mkdir(dfid: dfid, name: name.bytes, mode: mode, gid: gid)
            })
        case let .tmknod(dfid, name, mode, major, minor, gid):
            return .rmknod(qid: try expecting(dfid, name.bytes) { () throws(P9Errno) in
                try mknod(dfid: dfid, name: name.bytes, mode: mode, major: major, minor: minor, gid: gid)
            })
        case let .tsymlink(dfid, name, target, gid):
            return .rsymlink(qid: try expecting(dfid, name.bytes) { () throws(P9Errno) in
                try symlink(dfid: dfid, name: name.bytes, target: target.bytes, gid: gid)
            })
        case let .treadlink(fid):
            return .rreadlink(target: try readlink(fid: fid))
        case let .tlink(dfid, fid, name):
            try expecting(dfid, name.bytes) { () throws(P9Errno) in try link(dfid: dfid, fid: fid, name: name.bytes) }
            return .rlink
        case let .trenameat(olddirfid, oldname, newdirfid, newname):
            try expecting(olddirfid, oldname.bytes, attributes: false) { () throws(P9Errno) in
                try expecting(newdirfid, newname.bytes, attributes: false) { () throws(P9Errno) in
                    try renameat(olddirfid: olddirfid, oldname: oldname.bytes, newdirfid: newdirfid, newname: newname.bytes)
                }
            }
            return .rrenameat
        case let .trename(fid, dfid, name):
            try rename(fid: fid, dfid: dfid, name: name.bytes)
            return .rrename
        case let .tunlinkat(dirfid, name, flags):
            try expecting(dirfid, name.bytes, attributes: false) { () throws(P9Errno) in
                try unlinkat(dirfid: dirfid, name: name.bytes, flags: flags)
            }
            return .runlinkat
        case let .tfsync(fid, datasync):
            try fsync(fid: fid, datasync: datasync != 0)
            return .rfsync
        case let .tlock(fid, lock):
            return .rlock(status: try self.lock(fid: fid, lock))
        case let .tgetlock(fid, lock):
            return .rgetlock(lock: try getlock(fid: fid, lock))
        case let .txattrwalk(fid, newfid, name):
            return .rxattrwalk(size: try xattrwalk(fid: fid, newfid: newfid, name: name, gen))
        case let .txattrcreate(fid, name, size, flags):
            try xattrcreate(fid: fid, name: name, size: size, flags: flags)
            return .rxattrcreate
        case let .tzc(request):
            // A write's host events are the guest's own, as for Twrite: not echoed as change notes.
            if request.op == P9ZeroCopyRequest.Op.write {
                return try touching(request.fid) { () throws(P9Errno) in try zeroCopy(request) }
            }
            return try zeroCopy(request)
        case .unsupported(102):
            // Tauth: ENOENT is diod's (and libnpclient's) way of saying "no auth required".
            throw P9Errno(ENOENT)
        case .unsupported:
            throw P9Errno(EOPNOTSUPP)
        case .tversion, .tflush, .tuvmnotify:
            // Handled by the connection (they act on the session and on requests in flight).
            throw P9Errno(EINVAL)
        case .ruvmnotify, .rversion, .rattach, .rlerror, .rflush, .rwalk, .rlopen, .rlcreate, .rread, .rwrite, .rclunk,
             .rremove, .rstatfs, .rgetattr, .rsetattr, .ruvmsetattr, .ruvmlcreate, .ruvmclunk, .rreaddir, .rfsync, .rmkdir, .rmknod, .rsymlink,
             .rreadlink, .rlink, .rrename, .rrenameat, .runlinkat, .rlock, .rgetlock, .rxattrwalk, .rxattrcreate, .rzc:
            throw P9Errno(EPROTO)
        }
    }

    // MARK: fid table

    func lookup(_ n: UInt32) throws(P9Errno) -> Fid {
        guard let f = lock.withLock({ fids[n] }) else { throw P9Errno(EBADF) }
        return f
    }

    /// Installs a fid; fails if the number is taken (unless replacing `allowReplace`, for a walk onto
    /// itself).
    private func install(_ n: UInt32, _ f: Fid, replacing: Fid? = nil, _ gen: Int) throws(P9Errno) {
        guard n != P9.noFid else { throw P9Errno(EBADF) }
        let error: Int32? = lock.withLock {
            guard generation == gen else { return EBADF }
            if let existing = fids[n] {
                if existing !== replacing { return EBADF }
            } else if fids.count >= limits.fids {
                return EMFILE
            }
            fids[n] = f
            return nil
        }
        if let error { throw P9Errno(error) }
    }

    private func removeFid(_ n: UInt32) throws(P9Errno) -> Fid {
        guard let f = lock.withLock({ fids.removeValue(forKey: n) }) else { throw P9Errno(EBADF) }
        return f
    }

    func checkWritable() throws(P9Errno) {
        if export.readOnly { throw P9Errno(EROFS) }
    }

    // MARK: attach and walk

    private func attach(fid: UInt32, afid: UInt32, nUname: UInt32, _ gen: Int) throws(P9Errno) -> P9Message {
        // No Tauth (the transport is the authentication), so no afid can be valid.
        guard afid == P9.noFid else { throw P9Errno(EBADF) }
        let uid = nUname == P9.noUname ? core.euid : nUname
        let f = Fid(node: core.rootNode, uid: uid)
        try install(fid, f, gen)
        return .rattach(qid: core.qids.qid(core.rootStat))
    }

    private func walk(fid: UInt32, newfid: UInt32, names: [P9String], _ gen: Int) throws(P9Errno) -> P9Message {
        let f = try lookup(fid)
        if newfid != fid, lock.withLock({ fids[newfid] != nil }) { throw P9Errno(EBADF) }
        var node = f.snapshot.0
        var qids: [Qid] = []
        // Where the current run of ".." began: a run is checked once, at its end, to still be
        // beneath the root (the directories it passed are between its end and its start).
        var upFrom: Int?
        for (i, name) in names.enumerated() {
            do throws(P9Errno) {
                let up = name.bytes == Self.dotdot
                let (next, st) = up ? try walkUp(node) : try walkOne(node, name.bytes)
                if up && upFrom == nil { upFrom = i }
                node = next
                qids.append(core.qids.qid(st))
                if up && (i == names.count - 1 || names[i + 1].bytes != Self.dotdot) {
                    guard try isBeneathRoot(node) else { throw P9Errno(ENOENT) }
                    upFrom = nil
                }
            } catch {
                let failed = upFrom ?? i
                if failed == 0 { throw error }
                return .rwalk(qids: Array(qids.prefix(failed)))  // partial walk: newfid is not created
            }
        }
        try install(newfid, Fid(node: node, uid: f.uid), replacing: newfid == fid ? f : nil, gen)
        return .rwalk(qids: qids)
    }

    private static let dotdot: [UInt8] = [UInt8(ascii: "."), UInt8(ascii: ".")]

    /// ".." without the check that it is still beneath the root (the caller makes it).
    private func walkUp(_ node: Node) throws(P9Errno) -> (Node, HostStat) {
        if core.isRoot(node) {
            return (core.rootNode, core.rootStat)  // ".." of the export root is the root
        }
        let p = try HostFS.openParent(node.fd, lease: try descriptors.lease())
        let st = try HostFS.stat(p)
        // Reached upward: the name in its parent is unknown, so the legacy Trename/Tremove refuse it.
        return (Node(fd: p, parent: nil, name: [], stat: st), st)
    }

    private func walkOne(_ node: Node, _ name: [UInt8]) throws(P9Errno) -> (Node, HostStat) {
        if name == [UInt8(ascii: ".")] {
            return (node, try HostFS.stat(node.fd))
        }
        guard node.type == .dir else { throw P9Errno(ENOTDIR) }
        // Watched before the lookup: a change after it is seen.
        changes.withLockedValue { $0 }?.watch(node)
        let key = NodeKey(parent: ObjectIdentifier(node.fd), name: name)
        if let known = lock.withLock({ nodes[key]?.node }), known.parent === node.fd {
            // The name may have been replaced since: share the node only if it is the same inode.
            let st = try HostFS.statAt(node.fd, name)
            if known.isSame(st) { return (known, st) }
        }
        let fd = try HostFS.openBeneath(node.fd, name, flags: cp9_O_PATH, lease: try descriptors.lease())
        let st = try HostFS.stat(fd)
        let next = Node(fd: fd, parent: node.fd, name: name, stat: st, parentKey: node.key)
        lock.withLock {
            nodes[key] = WeakNode(node: next)
            // Drop the entries of nodes gone, once the table has doubled since the last sweep.
            if nodes.count > 2 * nodesAtSweep + 64 {
                nodes = nodes.filter { $0.value.node != nil }
                nodesAtSweep = nodes.count
            }
        }
        return (next, st)
    }

    /// Whether a directory is still the export root or below it: a host process may have moved it
    /// out of the share since a fid reached it. First the kernel's current name for it, resolved
    /// again beneath the root (a few syscalls); when that does not confirm it (moved out, a name
    /// over PATH_MAX, no openat2, a race), the walk up through ".." to the root decides.
    private func isBeneathRoot(_ node: Node) throws(P9Errno) -> Bool {
        if core.isRoot(node) { return true }
        if let path = HostFS.currentPath(node.fd), let root = HostFS.currentPath(core.root) {
            let prefix = root == [UInt8(ascii: "/")] ? root : root + [UInt8(ascii: "/")]
            if path.count > prefix.count, path.starts(with: prefix),
               let again = try? HostFS.openBeneath(core.root, path: Array(path[prefix.count...]), flags: cp9_O_PATH),
               let ast = try? HostFS.stat(again), node.isSame(ast) {
                return true
            }
        }
        var cur = node.fd
        var curSt = try HostFS.stat(node.fd)
        for _ in 0..<4096 {
            if core.isRoot(curSt) { return true }
            let p = try HostFS.openParent(cur)
            let pst = try HostFS.stat(p)
            if pst.dev == curSt.dev && pst.ino == curSt.ino { return false }  // the host's "/"
            cur = p
            curSt = pst
        }
        return false
    }

    // MARK: attributes

    private func loadMetadata(_ node: Node) -> GuestMetadata? {
        loadMetadata(node.fd, node.type)
    }

    private func loadMetadata(_ fd: HostFD, _ type: FileType?) -> GuestMetadata? {
        guard export.metadata, let type, type.openable else { return nil }
        guard let bytes = try? HostFS.getxattr(fd, GuestMetadata.xattrName) else { return nil }
        return GuestMetadata(bytes: bytes)
    }

    /// A symlink the guest made on a metadata share (a regular file on the host: see symlink).
    private func isGuestSymlink(_ fd: HostFD, _ type: FileType?) -> Bool {
        loadMetadata(fd, type).map { $0.guestType(host: type ?? .reg) == .lnk } ?? false
    }

    private func storeMetadata(_ fd: HostFD, _ meta: GuestMetadata) throws(P9Errno) {
        try HostFS.setxattr(fd, GuestMetadata.xattrName, meta.bytes, flags: 0)
    }

    /// The guest's owner and mode for a file just created. If they cannot be kept (no user xattrs
    /// on that file system, quota) the file is removed again and the guest gets the error: left,
    /// it would show the host user as its owner.
    private func storeNewMetadata(_ fd: HostFD, _ meta: GuestMetadata, in dir: Node, _ name: [UInt8]) throws(P9Errno) {
        do throws(P9Errno) {
            try storeMetadata(fd, meta)
        } catch {
            let isDir = meta.mode & 0o170000 == FileType.dir.rawValue
            _ = Glibc.unlinkat(dir.fd.raw, HostFS.cName(name), isDir ? cp9_AT_REMOVEDIR : 0)
            throw error
        }
    }

    /// Linux clears setuid, and setgid with group execute, when a file is written by a process
    /// without CAP_FSETID (killpriv). In metadata mode those bits exist only in the xattr, so the
    /// host kernel cannot do it; guest root stands in for CAP_FSETID.
    func killPriv(_ node: Node, writer: UInt32) throws(P9Errno) {
        guard writer != 0, var meta = loadMetadata(node), meta.guestType(host: .reg) == .reg else { return }
        let kill = Self.privBits(meta.mode)
        guard kill != 0 else { return }
        meta.mode &= ~kill
        try storeMetadata(node.fd, meta)
    }

    /// What killpriv clears: setuid, and setgid when group execute makes it mean setgid rather
    /// than mandatory locking. (Linux also clears a lone setgid when the caller is not in the
    /// file's group; 9P does not say the caller's groups, the guest kernel does that itself.)
    private static func privBits(_ mode: UInt32) -> UInt32 {
        var kill = mode & UInt32(S_ISUID)
        let sgid = UInt32(S_ISGID) | UInt32(S_IXGRP)
        if mode & sgid == sgid { kill |= UInt32(S_ISGID) }
        return kill
    }

    private func getattr(fid: UInt32, mask: UInt64) throws(P9Errno) -> P9Attr {
        let node = try lookup(fid).snapshot.0
        let st = try HostFS.stat(node.fd)
        var a = P9Attr()
        a.valid = P9.GetattrMask.basic | (st.has_btime != 0 ? P9.GetattrMask.btime : 0)
        a.qid = core.qids.qid(st)
        a.mode = st.mode
        a.uid = st.uid
        a.gid = st.gid
        a.nlink = st.nlink
        a.rdev = st.rdev
        a.size = st.size
        a.blksize = st.blksize
        a.blocks = st.blocks
        a.atimeSec = UInt64(bitPattern: st.atime_sec)
        a.atimeNsec = UInt64(st.atime_nsec)
        a.mtimeSec = UInt64(bitPattern: st.mtime_sec)
        a.mtimeNsec = UInt64(st.mtime_nsec)
        a.ctimeSec = UInt64(bitPattern: st.ctime_sec)
        a.ctimeNsec = UInt64(st.ctime_nsec)
        if st.has_btime != 0 {
            a.btimeSec = UInt64(bitPattern: st.btime_sec)
            a.btimeNsec = UInt64(st.btime_nsec)
        }
        if let meta = loadMetadata(node) {
            a.uid = meta.uid
            a.gid = meta.gid
            let hostType = st.mode & 0o170000
            switch st.fileType.map({ meta.guestType(host: $0) }) {
            case .lnk?:
                // Its size is the target's length, as for a symlink.
                a.mode = FileType.lnk.rawValue | 0o777
                a.qid.type = P9.QidType.symlink
            case let t? where t != st.fileType:
                a.mode = t.rawValue | (meta.mode & 0o7777)
                a.rdev = meta.rdev
                a.size = 0
            default:
                a.mode = hostType | (meta.mode & 0o7777)
            }
        }
        return a
    }

    /// The mode given to the host inode. Never setuid, never setgid on files: if uvmd runs as root
    /// a guest must not be able to plant a setuid-root program on the host. In metadata mode the
    /// guest's mode lives in the xattr and the host keeps owner access so the server can always
    /// serve the file.
    private func hostMode(_ mode: UInt32, isDir: Bool) -> UInt32 {
        if export.metadata {
            return (mode & 0o777) | (isDir ? 0o700 : 0o600)
        }
        return mode & (isDir ? 0o3777 : 0o1777)
    }

    private func setattr(fid: UInt32, _ a: P9SetAttr) throws(P9Errno) {
        try checkWritable()
        let f = try lookup(fid)
        let snapshot = f.snapshot
        var node = snapshot.0
        let state = snapshot.1
        var st = try HostFS.stat(node.fd)
        guard var type = st.fileType else { throw P9Errno(EINVAL) }
        var meta = loadMetadata(node)
        // What the guest sees: a guest symlink is a regular file here.
        let guest = meta?.guestType(host: type) ?? type
        let isDir = type == .dir
        var metaCapable = export.metadata && type.openable
        func defaultMeta() -> GuestMetadata {
            GuestMetadata(uid: st.uid, gid: st.gid, mode: st.mode, rdev: 0)
        }
        let setMode = a.valid & P9.SetattrMask.mode != 0

        if setMode {
            if guest == .lnk {
                throw P9Errno(EOPNOTSUPP)  // Linux has no symlink modes
            } else if metaCapable {
                var m = meta ?? defaultMeta()
                m.mode = (m.mode & 0o170000) | (a.mode & 0o7777)
                try storeMetadata(node.fd, m)
                meta = m
                try HostFS.chmod(node.fd, hostMode(a.mode, isDir: isDir))
            } else {
                try HostFS.chmod(node.fd, hostMode(a.mode, isDir: isDir))
            }
        }
        if a.valid & (P9.SetattrMask.uid | P9.SetattrMask.gid) != 0 {
            let setU = a.valid & P9.SetattrMask.uid != 0
            let setG = a.valid & P9.SetattrMask.gid != 0
            if export.metadata && type == .lnk && ((setU && a.uid != st.uid) || (setG && a.gid != st.gid)) {
                // A host symlink cannot carry the record: it becomes a guest symlink in place.
                node = try convertSymlink(f, node)
                st = try HostFS.stat(node.fd)
                type = .reg
                meta = loadMetadata(node)
                metaCapable = true
            }
            if metaCapable {
                var m = meta ?? defaultMeta()
                if setU { m.uid = a.uid }
                if setG { m.gid = a.gid }
                // chown clears setuid, and setgid with group execute, of anything but a directory,
                // whoever does it (Linux's chown_common), unless this request sets the mode too:
                // then that mode is what the guest kernel already worked out.
                if !setMode && guest != .dir { m.mode &= ~Self.privBits(m.mode) }
                try storeMetadata(node.fd, m)
                meta = m
            } else if (setU && a.uid != st.uid) || (setG && a.gid != st.gid) {
                // Files belong to the user running the server; a change of owner is refused rather
                // than attempted (as root it would let the guest give files to any host user).
                throw P9Errno(EPERM)
            }
        }
        if a.valid & P9.SetattrMask.size != 0 {
            guard type != .dir else { throw P9Errno(EISDIR) }
            guard type == .reg, guest == .reg else { throw P9Errno(EINVAL) }
            guard a.size <= UInt64(Int64.max) else { throw P9Errno(EFBIG) }
            // A truncate is a write (Linux's do_truncate kills privileges too).
            if export.metadata && !setMode { try killPriv(node, writer: f.uid) }
            let fd: HostFD
            if case .file(let open, true) = state {
                fd = open
            } else {
                fd = try HostFS.reopen(node.fd, flags: O_WRONLY, expect: st)
            }
            _ = try sys { ftruncate(fd.raw, off_t(a.size)) }
        }
        if a.valid & (P9.SetattrMask.atime | P9.SetattrMask.mtime) != 0 {
            func ts(_ set: UInt32, _ explicit: UInt32, _ sec: UInt64, _ nsec: UInt64) -> timespec {
                if a.valid & set == 0 { return timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2) }
                if a.valid & explicit == 0 { return timespec(tv_sec: 0, tv_nsec: (1 << 30) - 1) }
                return timespec(tv_sec: Int(truncatingIfNeeded: sec), tv_nsec: Int(min(nsec, 999_999_999)))
            }
            let times = [
                ts(P9.SetattrMask.atime, P9.SetattrMask.atimeSet, a.atimeSec, a.atimeNsec),
                ts(P9.SetattrMask.mtime, P9.SetattrMask.mtimeSet, a.mtimeSec, a.mtimeNsec),
            ]
            try HostFS.utimens(node.fd, isSymlink: type == .lnk, times)
        }
        // A lone ctime change needs nothing: the host updates ctime with every change above.
    }

    private func statfs(fid: UInt32) throws(P9Errno) -> P9StatFS {
        let node = try lookup(fid).snapshot.0
        var s = cp9_statfs()
        _ = try sys { cp9_fstatfs(node.fd.raw, &s) }
        var r = P9StatFS()
        r.type = UInt32(truncatingIfNeeded: s.type)
        r.bsize = UInt32(truncatingIfNeeded: s.bsize)
        r.blocks = s.blocks
        r.bfree = s.bfree
        r.bavail = s.bavail
        r.files = s.files
        r.ffree = s.ffree
        r.fsid = s.fsid
        r.namelen = UInt32(truncatingIfNeeded: s.namelen)
        return r
    }

    // MARK: open, create, I/O

    /// Tlopen/Tlcreate flags to host open(2) flags. O_DIRECT is dropped (our buffers are not
    /// aligned), O_NOATIME too (EPERM on files we do not own), and creation/follow flags are ours.
    private func hostOpenFlags(_ flags: UInt32) throws(P9Errno) -> Int32 {
        typealias F = P9.OpenFlags
        var r: Int32
        switch flags & F.accessMask {
        case F.rdonly: r = O_RDONLY
        case F.wronly: r = O_WRONLY
        case F.rdwr: r = O_RDWR
        default: throw P9Errno(EINVAL)
        }
        if flags & F.trunc != 0 { r |= O_TRUNC }
        if flags & F.append != 0 { r |= O_APPEND }
        if flags & F.nonblock != 0 { r |= O_NONBLOCK }
        if flags & F.sync != 0 { r |= O_SYNC } else if flags & F.dsync != 0 { r |= O_DSYNC }
        if flags & F.directory != 0 { r |= cp9_O_DIRECTORY }
        return r
    }

    private static func writes(_ flags: UInt32) -> Bool {
        flags & P9.OpenFlags.accessMask != P9.OpenFlags.rdonly || flags & (P9.OpenFlags.trunc | P9.OpenFlags.append) != 0
    }

    private var ioUnit: UInt32 { 0 }  // 0: the client uses msize - P9_IOHDRSZ

    private func lopen(fid: UInt32, flags: UInt32) throws(P9Errno) -> P9Message {
        let f = try lookup(fid)
        let (node, state) = f.snapshot
        guard case .none = state else { throw P9Errno(EINVAL) }
        if Self.writes(flags) { try checkWritable() }
        let st = try HostFS.stat(node.fd)
        guard let type = st.fileType else { throw P9Errno(EPERM) }
        switch type {
        case .lnk: throw P9Errno(ELOOP)
        case .chr, .blk, .fifo, .sock: throw P9Errno(EPERM)  // never opened on the host
        case .dir:
            if flags & P9.OpenFlags.accessMask != P9.OpenFlags.rdonly { throw P9Errno(EISDIR) }
        case .reg:
            if flags & P9.OpenFlags.directory != 0 { throw P9Errno(ENOTDIR) }
            if isGuestSymlink(node.fd, type) { throw P9Errno(ELOOP) }
        }
        let hostFlags = try hostOpenFlags(flags)
        let io = try HostFS.reopen(node.fd, flags: hostFlags, expect: st, lease: try descriptors.lease())
        let newState: OpenState = type == .dir ? .dir(io) : .file(io, writable: hostFlags & O_ACCMODE != O_RDONLY)
        let ok: Bool = f.lock.withLock {
            guard case .none = f.state else { return false }
            f.state = newState
            return true
        }
        guard ok else { throw P9Errno(EINVAL) }
        // Opening with O_TRUNC is a truncate, which kills privileges as a write does.
        if export.metadata && type == .reg && flags & P9.OpenFlags.trunc != 0 && hostFlags & O_ACCMODE != O_RDONLY {
            try killPriv(node, writer: f.uid)
        }
        return .rlopen(qid: core.qids.qid(st), iounit: ioUnit)
    }

    /// Sets the mode the guest asked for when the host umask took bits away.
    private func applyUmaskedMode(_ fd: HostFD, _ mode: UInt32) {
        if mode & core.umask != 0 { try? HostFS.chmod(fd, mode) }
    }

    private func metadataOwner(_ f: Fid, gid: UInt32) -> (UInt32, UInt32) {
        (f.uid, gid == P9.noUname ? getegid() : gid)
    }

    private func lcreate(fid: UInt32, name: [UInt8], flags: UInt32, mode: UInt32, gid: UInt32) throws(P9Errno) -> P9Message {
        try checkWritable()
        let f = try lookup(fid)
        let (dir, state) = f.snapshot
        guard case .none = state else { throw P9Errno(EINVAL) }
        guard dir.type == .dir else { throw P9Errno(ENOTDIR) }
        try HostFS.validateName(name)
        try ensureInShare(dir)
        var hostFlags = try hostOpenFlags(flags)
        hostFlags &= ~cp9_O_DIRECTORY
        let hmode = hostMode(mode, isDir: false)
        let io: HostFD
        var created = true
        // Both descriptors the fid keeps (open file and node) before anything is created.
        let ioLease = try descriptors.lease()
        let pathLease = try descriptors.lease()
        do throws(P9Errno) {
            // Always O_EXCL on the host: an existing name is opened only after checking it is a
            // regular file, so a FIFO or device planted under that name is never opened.
            io = try HostFS.openBeneath(dir.fd, name, flags: hostFlags | O_CREAT | O_EXCL | O_NONBLOCK, mode: hmode,
                                        lease: ioLease)
        } catch let e where e.code == EEXIST && flags & P9.OpenFlags.excl == 0 {
            created = false
            changes.withLockedValue { $0 }?.unexpectEntry(in: dir, name)  // nothing is created
            let p = try HostFS.openBeneath(dir.fd, name, flags: cp9_O_PATH)
            let st = try HostFS.stat(p)
            guard st.fileType == .reg else { throw P9Errno(st.fileType == .dir ? EISDIR : EEXIST) }
            if isGuestSymlink(p, .reg) { throw P9Errno(EEXIST) }
            io = try HostFS.reopen(p, flags: hostFlags, expect: st, lease: ioLease)
        }
        let fl = fcntl(io.raw, F_GETFL)
        if fl >= 0, hostFlags & O_NONBLOCK == 0 { _ = fcntl(io.raw, F_SETFL, fl & ~O_NONBLOCK) }
        let st = try HostFS.stat(io)
        guard st.fileType == .reg else { throw P9Errno(EPERM) }
        let pathFD = try HostFS.pathFD(of: io, lease: pathLease)
        if created {
            applyUmaskedMode(pathFD, hmode)
            if export.metadata {
                let (u, g) = metadataOwner(f, gid: gid)
                try storeNewMetadata(pathFD, GuestMetadata(uid: u, gid: g, mode: FileType.reg.rawValue | (mode & 0o7777), rdev: 0),
                                     in: dir, name)
            }
        }
        let node = Node(fd: pathFD, parent: dir.fd, name: name, stat: st, parentKey: dir.key)
        let writable = hostFlags & O_ACCMODE != O_RDONLY
        f.lock.withLock {
            f.node = node
            f.state = .file(io, writable: writable)
        }
        return .rlcreate(qid: core.qids.qid(st), iounit: ioUnit)
    }

    /// Tuvmlcreate: Tlcreate on a clone of `dfid` installed as `ofid`, `pfid` bound to the new
    /// file, its attributes and the directory's after the create. Both new fids are taken before
    /// anything is created, and given back if the create fails, so a failure leaves the session
    /// as it was.
    private func lcreateBinding(dfid: UInt32, ofid: UInt32, pfid: UInt32, name: [UInt8], flags: UInt32, mode: UInt32,
                                gid: UInt32, _ gen: Int) throws(P9Errno) -> P9Message {
        guard ofid != pfid, ofid != dfid, pfid != dfid else { throw P9Errno(EBADF) }
        let d = try lookup(dfid)
        let dir = d.snapshot.0
        let bound = Fid(node: dir, uid: d.uid)
        try install(ofid, Fid(node: dir, uid: d.uid), gen)
        do throws(P9Errno) {
            try install(pfid, bound, gen)
        } catch {
            _ = try? removeFid(ofid)
            throw error
        }
        do throws(P9Errno) {
            guard case let .rlcreate(_, iounit) = try lcreate(fid: ofid, name: name, flags: flags, mode: mode, gid: gid)
            else { throw P9Errno(EIO) }
            let created = try lookup(ofid).snapshot.0
            bound.lock.withLock { bound.node = created }
            return .ruvmlcreate(iounit: iounit, attr: try getattr(fid: pfid, mask: P9.GetattrMask.all),
                                dir: try getattr(fid: dfid, mask: P9.GetattrMask.all))
        } catch {
            _ = try? removeFid(ofid)
            _ = try? removeFid(pfid)
            throw error
        }
    }

    var maxIO: Int { Int(msize) - P9.ioHeaderSize }

    func read(fid: UInt32, offset: UInt64, count: UInt32) throws(P9Errno) -> ByteBuffer {
        let (_, state) = try lookup(fid).snapshot
        let n = min(Int(count), maxIO)
        switch state {
        case .file(let fd, _):
            guard offset <= UInt64(Int64.max) else { throw P9Errno(EINVAL) }
            var buf = allocator.buffer(capacity: n)
            var done = 0
            var err: Int32 = 0
            buf.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { ptr in
                while done < n {
                    let r = pread(fd.raw, ptr.baseAddress! + done, n - done, off_t(offset) + off_t(done))
                    if r > 0 { done += r; continue }
                    if r == 0 { break }
                    if errno == EINTR { continue }
                    err = errno
                    break
                }
                return done
            }
            if done == 0 && err != 0 { throw P9Errno(err) }
            return buf
        case .xattrRead(let bytes, _):
            guard offset < UInt64(bytes.count) else { return allocator.buffer(capacity: 0) }
            let start = Int(offset)
            let end = min(bytes.count, start + n)
            return allocator.buffer(bytes: bytes[start..<end])
        case .dir:
            throw P9Errno(EISDIR)
        case .none, .xattrWrite:
            throw P9Errno(EBADF)
        }
    }

    func write(fid: UInt32, offset: UInt64, data: ByteBuffer) throws(P9Errno) -> UInt32 {
        try checkWritable()
        let f = try lookup(fid)
        let (node, state) = f.snapshot
        switch state {
        case .file(let fd, let writable):
            guard writable else { throw P9Errno(EBADF) }
            guard offset <= UInt64(Int64.max) else { throw P9Errno(EINVAL) }
            if export.metadata { try killPriv(node, writer: f.uid) }
            var done = 0
            var err: Int32 = 0
            data.withUnsafeReadableBytes { ptr in
                while done < ptr.count {
                    let r = pwrite(fd.raw, ptr.baseAddress! + done, ptr.count - done, off_t(offset) + off_t(done))
                    if r > 0 { done += r; continue }
                    if r < 0 && errno == EINTR { continue }
                    err = r < 0 ? errno : EIO
                    break
                }
            }
            if done == 0 && err != 0 && data.readableBytes > 0 { throw P9Errno(err) }
            writeBehind?.wrote(fd, at: offset, count: done)
            return UInt32(done)
        case .xattrWrite:
            return try f.lock.withLockTyped { () throws(P9Errno) -> UInt32 in
                guard case .xattrWrite(let name, let size, let flags, var value, let lease) = f.state else { throw P9Errno(EBADF) }
                guard offset <= UInt64(size), UInt64(data.readableBytes) <= UInt64(size) - offset else {
                    throw P9Errno(ENOSPC)
                }
                let start = Int(offset)
                if value.count < start + data.readableBytes {
                    value.append(contentsOf: repeatElement(0, count: start + data.readableBytes - value.count))
                }
                data.withUnsafeReadableBytes { src in
                    for i in 0..<src.count { value[start + i] = src[i] }
                }
                f.state = .xattrWrite(name: name, size: size, flags: flags, value: value, lease)
                return UInt32(data.readableBytes)
            }
        case .dir:
            throw P9Errno(EISDIR)
        case .none, .xattrRead:
            throw P9Errno(EBADF)
        }
    }

    /// Offsets are the host's own d_off cookies (lseek + getdents64), so they stay valid between
    /// calls and across concurrent changes to the directory, as they would on the host.
    func readdir(fid: UInt32, offset: UInt64, count: UInt32) throws(P9Errno) -> ByteBuffer {
        let f = try lookup(fid)
        let (dirNode, state) = f.snapshot
        guard case .dir(let fd) = state else { throw P9Errno(dirNode.type == .dir ? EBADF : ENOTDIR) }
        guard offset <= UInt64(Int64.max) else { throw P9Errno(EINVAL) }
        // Rreaddir is header[7] count[4] data; the whole reply must stay below msize.
        let limit = min(Int(count), Int(msize) - P9.headerSize - 4 - 1)
        var out = allocator.buffer(capacity: min(limit, 64 * 1024))
        let dirIsRoot = core.isRoot(dirNode)
        let dirQid = core.qids.path(dev: dirNode.dev, ino: dirNode.ino)
        var scratch = [UInt8](repeating: 0, count: 32 * 1024)
        var full = false
        var sawEntry = false
        try f.lock.withLockTyped { () throws(P9Errno) in
            guard lseek(fd.raw, off_t(offset), SEEK_SET) >= 0 else { throw P9Errno(errno) }
            while !full {
                let n = try sysSize { scratch.withUnsafeMutableBytes { cp9_getdents64(fd.raw, $0.baseAddress, $0.count) } }
                if n == 0 { break }
                var pos = 0
                var bad = false
                scratch.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
                    while pos < n {
                        let ino = raw.loadUnaligned(fromByteOffset: pos, as: UInt64.self)
                        let off = raw.loadUnaligned(fromByteOffset: pos + 8, as: Int64.self)
                        let reclen = Int(raw.loadUnaligned(fromByteOffset: pos + 16, as: UInt16.self))
                        var dtype = raw[pos + 18]
                        let nameStart = pos + 19
                        var nameEnd = nameStart
                        while nameEnd < pos + reclen && raw[nameEnd] != 0 { nameEnd += 1 }
                        guard reclen > 0, pos + reclen <= n else {
                            bad = true
                            return
                        }
                        let name = Array(raw[nameStart..<nameEnd])
                        let size = Qid.wireSize + 8 + 1 + 2 + name.count
                        sawEntry = true
                        if out.readableBytes + size > limit {
                            full = true
                            return
                        }
                        if dtype == 0, let st = try? HostFS.statAt(fd, name) {
                            dtype = UInt8(truncatingIfNeeded: (st.mode & 0o170000) >> 12)
                        }
                        let qtype: UInt8 = dtype == 4 ? P9.QidType.dir
                            : dtype == 10 ? P9.QidType.symlink : P9.QidType.file
                        var qpath = core.qids.path(dev: dirNode.dev, ino: ino)
                        if name == [UInt8(ascii: ".")] { qpath = dirQid }
                        if dirIsRoot && name == [UInt8(ascii: "."), UInt8(ascii: ".")] { qpath = dirQid }
                        out.p9WriteDirEntry(P9DirEntry(qid: Qid(type: qtype, path: qpath), offset: UInt64(bitPattern: off),
                                                       type: dtype, name: P9String(bytes: name)))
                        pos += reclen
                    }
                }
                if bad { throw P9Errno(EIO) }
            }
        }
        if out.readableBytes == 0 && sawEntry { throw P9Errno(EINVAL) }  // count too small for one entry
        return out
    }

    private func fsync(fid: UInt32, datasync: Bool) throws(P9Errno) {
        let (_, state) = try lookup(fid).snapshot
        switch state {
        case .file(let fd, _), .dir(let fd):
            _ = try sys { datasync ? fdatasync(fd.raw) : Glibc.fsync(fd.raw) }
        default:
            throw P9Errno(EBADF)
        }
    }

    // MARK: directory entries

    /// The directory a fid names, for a change in it (create, link, rename, unlink).
    private func dirNode(_ n: UInt32) throws(P9Errno) -> Node {
        let node = try lookup(n).snapshot.0
        guard node.type == .dir else { throw P9Errno(ENOTDIR) }
        try ensureInShare(node)
        return node
    }

    /// A fid keeps its directory when the host moves that directory out of the share; from then on
    /// nothing may be created, linked, renamed or removed through it (it would happen outside).
    private func ensureInShare(_ dir: Node) throws(P9Errno) {
        guard try isBeneathRoot(dir) else { throw P9Errno(ENOENT) }
    }

    /// The qid of an entry just created, and an cp9_O_PATH fd to it when it is a directory or regular
    /// file (for the metadata xattr), with its stat. A concurrent swap of the name only affects the
    /// qid reported.
    private func created(_ dir: Node, _ name: [UInt8], expect: FileType) throws(P9Errno) -> (Qid, (HostFD, HostStat)?) {
        if expect.openable, let fd = try? HostFS.openBeneath(dir.fd, name, flags: cp9_O_PATH | (expect == .dir ? cp9_O_DIRECTORY : 0)) {
            let st = try HostFS.stat(fd)
            return (core.qids.qid(st), st.fileType == expect ? (fd, st) : nil)
        }
        return (core.qids.qid(try HostFS.statAt(dir.fd, name)), nil)
    }

    private func mkdir(dfid: UInt32, name: [UInt8], mode: UInt32, gid: UInt32) throws(P9Errno) -> Qid {
        try checkWritable()
        let f = try lookup(dfid)
        let dir = try dirNode(dfid)
        try HostFS.validateName(name)
        let hmode = hostMode(mode, isDir: true)
        let c = HostFS.cName(name)
        _ = try sys { mkdirat(dir.fd.raw, c, mode_t(hmode)) }
        let (qid, made) = try created(dir, name, expect: .dir)
        if let (fd, st) = made {
            applyUmaskedMode(fd, hmode)
            if export.metadata {
                let (u, g) = metadataOwner(f, gid: gid)
                try storeNewMetadata(fd, GuestMetadata(uid: u, gid: g, mode: FileType.dir.rawValue | (mode & 0o7777), rdev: 0),
                                     in: dir, name)
            }
            // Watched once set up: its own mode and metadata changes would come back as notes.
            changes.withLockedValue { $0 }?.watchNew(Node(fd: fd, parent: dir.fd, name: name, stat: st, parentKey: dir.key))
        }
        return qid
    }

    /// Device nodes are never created on the host. In metadata mode every special file the guest
    /// makes (device, FIFO, socket) is an empty regular file whose type and rdev live in the
    /// metadata xattr; the guest kernel handles the special file itself and never asks the server to
    /// open it. Without metadata, FIFOs and sockets are created for real (inert inodes: the server
    /// never opens them) and devices are refused with EPERM.
    private func mknod(dfid: UInt32, name: [UInt8], mode: UInt32, major: UInt32, minor: UInt32, gid: UInt32) throws(P9Errno) -> Qid {
        try checkWritable()
        let f = try lookup(dfid)
        let dir = try dirNode(dfid)
        try HostFS.validateName(name)
        let type = FileType(mode: mode == mode & 0o7777 ? mode | FileType.reg.rawValue : mode)
        guard let type, type != .dir, type != .lnk else { throw P9Errno(EINVAL) }
        let hmode = hostMode(mode, isDir: false)
        let c = HostFS.cName(name)
        if export.metadata {
            _ = try sys { mknodat(dir.fd.raw, c, mode_t(FileType.reg.rawValue | hmode), 0) }
            let (qid, made) = try created(dir, name, expect: .reg)
            if let (fd, _) = made {
                let (u, g) = metadataOwner(f, gid: gid)
                let rdev = type == .chr || type == .blk ? cp9_makedev(major, minor) : 0
                try storeNewMetadata(fd, GuestMetadata(uid: u, gid: g, mode: type.rawValue | (mode & 0o7777), rdev: rdev),
                                     in: dir, name)
            }
            return Qid(type: P9.QidType.file, path: qid.path)
        }
        switch type {
        case .reg, .fifo, .sock:
            _ = try sys { mknodat(dir.fd.raw, c, mode_t(type.rawValue | hmode), 0) }
        default:
            throw P9Errno(EPERM)
        }
        let (qid, made) = try created(dir, name, expect: type)
        if let (fd, _) = made { applyUmaskedMode(fd, hmode) }
        return qid
    }

    private func symlink(dfid: UInt32, name: [UInt8], target: [UInt8], gid: UInt32) throws(P9Errno) -> Qid {
        try checkWritable()
        let f = try lookup(dfid)
        let dir = try dirNode(dfid)
        try HostFS.validateName(name)
        // The target is stored, never followed by the server, so any string is acceptable.
        guard !target.isEmpty, !target.contains(0) else { throw P9Errno(EINVAL) }
        guard target.count < Int(PATH_MAX) else { throw P9Errno(ENAMETOOLONG) }
        if export.metadata {
            let (u, g) = metadataOwner(f, gid: gid)
            let meta = GuestMetadata(uid: u, gid: g, mode: FileType.lnk.rawValue | 0o777, rdev: 0)
            let st = try makeGuestSymlink(in: dir.fd, name, target: target, meta, replace: false)
            return Qid(type: P9.QidType.symlink, path: core.qids.path(dev: st.dev, ino: st.ino))
        }
        let c = HostFS.cName(name)
        let t = HostFS.cName(target)
        _ = try sys { symlinkat(t, dir.fd.raw, c) }
        return try created(dir, name, expect: .lnk).0
    }

    /// A guest symlink on a metadata share is a regular file holding the target, with the owner
    /// in its record (QEMU's mapped-xattr does the same). A host symlink cannot carry the record
    /// (Linux refuses user.* xattrs on symlinks), and a record kept on the parent directory by
    /// name would have to follow every rename, unlink and hard link and would run into the
    /// directory's xattr space. The record is the inode's, so hard links and renames keep it;
    /// the size is the target's length (< PATH_MAX); and the host never has a symlink that the
    /// guest made, for the server or anything else there to follow. A host user sees a small
    /// file naming the target.
    /// Made in an O_TMPFILE and linked in whole, so nobody sees it half made; `replace` renames
    /// it over `name` instead (a host symlink becoming a guest one).
    private func makeGuestSymlink(in dir: HostFD, _ name: [UInt8], target: [UInt8], _ meta: GuestMetadata,
                                  replace: Bool) throws(P9Errno) -> HostStat {
        let c = HostFS.cName(name)
        var file: HostFD?
        if HostFS.procSelfFD >= 0 {
            do throws(P9Errno) {
                file = HostFD(try sys { openat(dir.raw, ".", cp9_O_TMPFILE | O_WRONLY | O_CLOEXEC, 0o644) })
            } catch let e where [EOPNOTSUPP, EISDIR, EINVAL, ENOENT].contains(e.code) {
                file = nil  // no O_TMPFILE on this file system: made under a temporary name below
            }
        }
        let named = file == nil
        var linkName = replace || named ? Array(".uvm-symlink-\(UInt64.random(in: 0...UInt64.max))".utf8) : name
        if named {
            file = try HostFS.openBeneath(dir, linkName, flags: O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o644)
        }
        guard let file else { throw P9Errno(EIO) }
        var linked = named
        do throws(P9Errno) {
            var done = 0
            while done < target.count {
                let n = try sysSize { target.withUnsafeBytes { pwrite(file.raw, $0.baseAddress! + done, $0.count - done, off_t(done)) } }
                guard n > 0 else { throw P9Errno(EIO) }
                done += n
            }
            try storeMetadata(file, meta)
            if !named {
                let num = HostFS.cName(Array(String(file.raw).utf8))
                let l = HostFS.cName(linkName)
                _ = try sys { linkat(HostFS.procSelfFD, num, dir.raw, l, cp9_AT_SYMLINK_FOLLOW) }
                linked = true
            }
            if linkName != name {
                let l = HostFS.cName(linkName)
                if replace {
                    _ = try sys { Glibc.renameat(dir.raw, l, dir.raw, c) }
                } else {
                    // renameat would replace an existing name; a symlink never does.
                    _ = try sys { linkat(dir.raw, l, dir.raw, c, 0) }
                    _ = Glibc.unlinkat(dir.raw, l, 0)
                }
                linkName = name
            }
        } catch {
            if linked { _ = Glibc.unlinkat(dir.raw, HostFS.cName(linkName), 0) }
            throw error
        }
        return try HostFS.stat(file)
    }

    /// lchown of a symlink made on the host: it is replaced, under the same name, by a guest
    /// symlink with the same target, so that the owner can be kept. The fid follows it.
    private func convertSymlink(_ f: Fid, _ node: Node) throws(P9Errno) -> Node {
        let (parent, name) = try entry(of: node)
        let target = try HostFS.readlink(node.fd)
        let st = try HostFS.stat(node.fd)
        let meta = GuestMetadata(uid: st.uid, gid: st.gid, mode: FileType.lnk.rawValue | 0o777, rdev: 0)
        _ = try makeGuestSymlink(in: parent, name, target: target, meta, replace: true)
        let fd = try HostFS.openBeneath(parent, name, flags: cp9_O_PATH, lease: try descriptors.lease())
        let next = Node(fd: fd, parent: parent, name: name, stat: try HostFS.stat(fd))
        f.lock.withLock { f.node = next }
        return next
    }

    private func readlink(fid: UInt32) throws(P9Errno) -> P9String {
        let node = try lookup(fid).snapshot.0
        let target: [UInt8]
        if node.type == .lnk {
            target = try HostFS.readlink(node.fd)
        } else if isGuestSymlink(node.fd, node.type) {
            target = try readGuestSymlink(node)
        } else {
            throw P9Errno(EINVAL)
        }
        // Rreadlink must stay below msize.
        guard P9.headerSize + 2 + target.count < Int(msize) else { throw P9Errno(ENAMETOOLONG) }
        return P9String(bytes: target)
    }

    /// The target a guest symlink holds; no more than PATH_MAX bytes are read, whatever the host
    /// made of the file.
    private func readGuestSymlink(_ node: Node) throws(P9Errno) -> [UInt8] {
        let io = try HostFS.reopen(node.fd, flags: O_RDONLY, expect: try HostFS.stat(node.fd))
        var buf = [UInt8](repeating: 0, count: Int(PATH_MAX))
        var done = 0
        while done < buf.count {
            let n = try sysSize { buf.withUnsafeMutableBytes { pread(io.raw, $0.baseAddress! + done, $0.count - done, off_t(done)) } }
            if n == 0 { break }
            done += n
        }
        guard done < buf.count else { throw P9Errno(ENAMETOOLONG) }
        return Array(buf[0..<done])
    }

    /// The source is a fid, so it is inside the export by construction: a guest cannot name a host
    /// file outside the share to link to.
    private func link(dfid: UInt32, fid: UInt32, name: [UInt8]) throws(P9Errno) {
        try checkWritable()
        let dir = try dirNode(dfid)
        let node = try lookup(fid).snapshot.0
        try HostFS.validateName(name)
        guard node.type != .dir else { throw P9Errno(EPERM) }
        let c = HostFS.cName(name)
        do throws(P9Errno) {
            // AT_EMPTY_PATH links the cp9_O_PATH fd's inode itself (needs CAP_DAC_READ_SEARCH).
            _ = try sys { linkat(node.fd.raw, "", dir.fd.raw, c, cp9_AT_EMPTY_PATH) }
        } catch let e where (e.code == ENOENT || e.code == EPERM) && node.type != .lnk && HostFS.procSelfFD >= 0 {
            // Unprivileged form: the /proc magic link of our own fd names exactly that inode.
            // Not for symlinks, whose body must not be followed.
            let num = HostFS.cName(Array(String(node.fd.raw).utf8))
            _ = try sys { linkat(HostFS.procSelfFD, num, dir.fd.raw, c, cp9_AT_SYMLINK_FOLLOW) }
        }
    }

    private func renameat(olddirfid: UInt32, oldname: [UInt8], newdirfid: UInt32, newname: [UInt8]) throws(P9Errno) {
        try checkWritable()
        let od = try dirNode(olddirfid)
        let nd = try dirNode(newdirfid)
        try HostFS.validateName(oldname)
        try HostFS.validateName(newname)
        let o = HostFS.cName(oldname)
        let n = HostFS.cName(newname)
        _ = try sys { Glibc.renameat(od.fd.raw, o, nd.fd.raw, n) }
    }

    /// The (parent, name) a legacy fid-named operation acts on, checked to still be this inode.
    private func entry(of node: Node) throws(P9Errno) -> (HostFD, [UInt8]) {
        guard let parent = node.parent, !node.name.isEmpty else {
            throw P9Errno(core.isRoot(node) ? EBUSY : EINVAL)
        }
        let st = try HostFS.statAt(parent, node.name)
        guard node.isSame(st) else { throw P9Errno(ENOENT) }
        return (parent, node.name)
    }

    private func rename(fid: UInt32, dfid: UInt32, name: [UInt8]) throws(P9Errno) {
        try checkWritable()
        let f = try lookup(fid)
        let nd = try dirNode(dfid)
        try HostFS.validateName(name)
        let node = f.snapshot.0
        let (parent, oldname) = try entry(of: node)
        let o = HostFS.cName(oldname)
        let n = HostFS.cName(name)
        _ = try sys { Glibc.renameat(parent.raw, o, nd.fd.raw, n) }
        let st = try HostFS.stat(node.fd)
        f.lock.withLock { f.node = Node(fd: node.fd, parent: nd.fd, name: name, stat: st, parentKey: nd.key) }
    }

    private func unlinkat(dirfid: UInt32, name: [UInt8], flags: UInt32) throws(P9Errno) {
        try checkWritable()
        let dir = try dirNode(dirfid)
        try HostFS.validateName(name)
        guard flags & ~P9.atRemoveDir == 0 else { throw P9Errno(EINVAL) }
        let c = HostFS.cName(name)
        _ = try sys { Glibc.unlinkat(dir.fd.raw, c, flags & P9.atRemoveDir != 0 ? cp9_AT_REMOVEDIR : 0) }
    }

    /// Legacy Tremove: the fid is clunked whether or not the removal works.
    private func remove(fid: UInt32) throws(P9Errno) {
        let f = try removeFid(fid)
        try checkWritable()
        let node = f.snapshot.0
        let (parent, name) = try entry(of: node)
        let c = HostFS.cName(name)
        _ = try sys { Glibc.unlinkat(parent.raw, c, node.type == .dir ? cp9_AT_REMOVEDIR : 0) }
    }

    /// Tclunk's work. Only a clunk that sets a pending xattr changes anything: the guest clunks
    /// the fids of cached entries whenever it likes, and a host change then must not pass for its own.
    private func clunkRequest(_ fid: UInt32) throws(P9Errno) {
        if case .xattrWrite = lock.withLock({ fids[fid] })?.snapshot.1 {
            try touching(fid) { () throws(P9Errno) in try clunk(fid: fid) }
        } else {
            try clunk(fid: fid)
        }
    }

    private func clunk(fid: UInt32) throws(P9Errno) {
        let f = try removeFid(fid)
        let (node, state) = f.snapshot
        if case .xattrWrite(let name, let size, let flags, let value, _) = state {
            // The value is set only now, in one piece, as the Linux client expects.
            guard value.count == size else { throw P9Errno(EINVAL) }
            if size == 0 {
                // The client sends a zero-size create for removexattr (value NULL).
                do throws(P9Errno) {
                    try HostFS.removexattr(node.fd, name)
                } catch let e where e.code == ENODATA && flags & Self.xattrReplace == 0 {
                    try HostFS.setxattr(node.fd, name, [], flags: flags)
                }
            } else {
                try HostFS.setxattr(node.fd, name, value, flags: flags)
            }
        }
    }

    // MARK: locks

    private func lockFD(_ n: UInt32) throws(P9Errno) -> HostFD {
        guard case .file(let fd, _) = try lookup(n).snapshot.1 else { throw P9Errno(EBADF) }
        return fd
    }

    /// POSIX record locks become open-file-description locks on the fid's own open file: each guest
    /// open has its own fid, so locks of different guest processes conflict as on a local disk.
    /// Never blocks: the Linux client retries itself on LOCK_BLOCKED.
    private func lock(fid: UInt32, _ l: P9Lock) throws(P9Errno) -> UInt8 {
        let fd = try validatedLockFD(fid, l)
        var type = Int32(l.type)
        var start = Int64(l.start)
        var len = Int64(l.length)
        var pid: Int32 = 0
        if cp9_ofd_lock(fd.raw, 0, &type, &start, &len, &pid) == 0 { return P9.LockStatus.success }
        let e = errno
        if e == EAGAIN || e == EACCES || e == EINTR { return P9.LockStatus.blocked }
        throw P9Errno(e)
    }

    /// The fid's open file, once the request's lock type and range fit an OFD lock.
    private func validatedLockFD(_ fid: UInt32, _ l: P9Lock) throws(P9Errno) -> HostFD {
        let fd = try lockFD(fid)
        guard l.type <= P9.LockType.unlck, l.start <= UInt64(Int64.max), l.length <= UInt64(Int64.max) else {
            throw P9Errno(EINVAL)
        }
        return fd
    }

    private func getlock(fid: UInt32, _ l: P9Lock) throws(P9Errno) -> P9Lock {
        let fd = try validatedLockFD(fid, l)
        var type = Int32(l.type)
        var start = Int64(l.start)
        var len = Int64(l.length)
        var pid: Int32 = 0
        _ = try sys { cp9_ofd_lock(fd.raw, 1, &type, &start, &len, &pid) }
        if type == Int32(P9.LockType.unlck) {
            return P9Lock(type: P9.LockType.unlck, start: l.start, length: l.length, procID: l.procID, clientID: l.clientID)
        }
        // OFD locks carry no pid (-1): report the holder generically.
        return P9Lock(type: UInt8(type), start: UInt64(start), length: UInt64(len), procID: UInt32(bitPattern: pid),
                      clientID: l.clientID)
    }

    // MARK: xattrs

    /// Only the user namespace crosses: security.* (file capabilities, SELinux labels), trusted.*
    /// and system.* (ACLs naming host users) mean something to the host kernel, and user.uvm.* is
    /// the server's own.
    private static func guestXattrName(_ name: String) -> Bool {
        name.hasPrefix("user.") && !name.hasPrefix(GuestMetadata.reservedPrefix)
    }

    private static let xattrSizeMax = 65536
    static let xattrCreate: Int32 = 1  // XATTR_CREATE
    static let xattrReplace: Int32 = 2  // XATTR_REPLACE

    private func xattrwalk(fid: UInt32, newfid: UInt32, name: P9String, _ gen: Int) throws(P9Errno) -> UInt64 {
        let f = try lookup(fid)
        let node = f.snapshot.0
        let nameString = String(decoding: name.bytes, as: UTF8.self)
        let value: [UInt8]
        if name.bytes.isEmpty {
            if node.type?.openable == true {
                let names = try HostFS.listxattr(node.fd).filter(Self.guestXattrName)
                value = names.flatMap { Array($0.utf8) + [0] }
            } else {
                value = []
            }
        } else {
            guard !name.bytes.contains(0), Array(nameString.utf8) == name.bytes,
                  Self.guestXattrName(nameString) else { throw P9Errno(EOPNOTSUPP) }
            guard node.type?.openable == true else { throw P9Errno(ENODATA) }
            value = try HostFS.getxattr(node.fd, nameString)
        }
        let nf = Fid(node: node, uid: f.uid)
        nf.state = .xattrRead(value, try xattrBytes.lease(value.count))
        try install(newfid, nf, replacing: newfid == fid ? f : nil, gen)
        return UInt64(value.count)
    }

    private func xattrcreate(fid: UInt32, name: P9String, size: UInt64, flags: UInt32) throws(P9Errno) {
        try checkWritable()
        let f = try lookup(fid)
        let (node, state) = f.snapshot
        guard case .none = state else { throw P9Errno(EINVAL) }
        let nameString = String(decoding: name.bytes, as: UTF8.self)
        guard !name.bytes.contains(0), Array(nameString.utf8) == name.bytes,
              Self.guestXattrName(nameString) else { throw P9Errno(EOPNOTSUPP) }
        guard node.type?.openable == true else { throw P9Errno(EPERM) }
        guard size <= UInt64(Self.xattrSizeMax) else { throw P9Errno(E2BIG) }
        let valid = UInt32(Self.xattrCreate | Self.xattrReplace)
        guard flags & ~valid == 0 else { throw P9Errno(EINVAL) }
        // The whole declared size up front: the Twrites that fill it cannot then go over.
        let lease = try xattrBytes.lease(Int(size))
        try f.lock.withLockTyped { () throws(P9Errno) in
            guard case .none = f.state else { throw P9Errno(EINVAL) }
            f.state = .xattrWrite(name: nameString, size: Int(size), flags: Int32(flags), value: [], lease)
        }
    }
}
