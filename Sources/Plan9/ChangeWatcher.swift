import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOPosix

/// Host-side changes to an export's directories, for guests that cache metadata (cache=meta,
/// kernel-patches/0006): every directory a guest has looked a name up in is watched with
/// inotify, and each change the guest did not make itself becomes a `P9Note` pushed to every
/// subscribed session, which the guest turns into dropped dentries and refetched attributes.
///
/// inotify rather than fanotify: fanotify's directory-entry events need CAP_SYS_ADMIN, and uvmd
/// runs as the user. A directory that cannot be watched (the watch limit) is announced as
/// uncached, so the guest never trusts a cache nobody keeps true.
final class ChangeWatcher: @unchecked Sendable {
    struct DirKey: Hashable {
        var dev: UInt64
        var ino: UInt64
    }

    private struct Expected: Hashable {
        var wd: Int32
        var name: [UInt8]
    }

    private let fd: Int32
    /// A pipe whose write end `stop` closes, waking the reader's poll.
    private let wake: Int32
    private let wakeWriter: Int32
    private let qids: QidMapper
    private let logger: Logger
    private let maxWatches: Int
    private let thread = NIOThreadPool(numberOfThreads: 1)
    private let lock = NIOLock()
    // Everything below is under `lock`.
    private var byKey: [DirKey: Int32] = [:]
    private var byWd: [Int32: (key: DirKey, path: UInt64)] = [:]
    private var subscribers: [ObjectIdentifier: @Sendable ([P9Note]) -> Void] = [:]
    /// Entry events (create, delete, rename) the guest's own requests are about to cause, counted:
    /// each suppresses exactly one event. Dropped after `expectFor` if the event never came.
    private var expectedNames: [Expected: (count: Int, until: UInt64)] = [:]
    /// Attribute events the guest's own requests cause (chown, xattrs after a create): inotify
    /// merges repeats, so they cannot be counted. Suppressed while the request runs, and once it
    /// is done up to the end of what the queue held then (its events are all in there; what a
    /// host process does after it comes later in the stream and is reported).
    private var expectedAttrs: [Expected: AttrWindow] = [:]
    private enum AttrWindow {
        case running
        /// Done when `reads` reads had started and `queued` bytes waited in the queue: every byte
        /// of those reads (one may still be in flight) and the next `queued` ones came before.
        case done(reads: UInt64, queued: UInt64)
        /// Up to this stream offset.
        case until(UInt64)
    }
    /// Reads of the inotify queue started so far.
    private var readsStarted: UInt64 = 0
    /// Bytes of the inotify stream read so far: an event's position is this plus its offset.
    private var consumed: UInt64 = 0
    /// Directories announced as uncached.
    private var uncached = Set<DirKey>()
    private var stopped = false
    private var warnedFull = false

    private static let watchMask: UInt32 = 0x100 | 0x200 | 0x40 | 0x80 | 0x4 | 0x2 | 0x0100_0000 | 0x0400_0000
    // IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_MODIFY | IN_ONLYDIR | IN_EXCL_UNLINK
    private static let entryMask: UInt32 = 0x100 | 0x200 | 0x40 | 0x80
    private static let attrMask: UInt32 = 0x4 | 0x2
    private static let ignored: UInt32 = 0x8000
    private static let overflow: UInt32 = 0x4000
    private static let expectFor: UInt64 = 2_000_000_000

    init(qids: QidMapper, logger: Logger, maxWatches: Int = 32768) throws(P9Errno) {
        let fd = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        guard fd >= 0 else { throw P9Errno(errno) }
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0, fcntl(pipeFDs[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(pipeFDs[1], F_SETFD, FD_CLOEXEC) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw P9Errno(e)
        }
        self.fd = fd
        self.wake = pipeFDs[0]
        self.wakeWriter = pipeFDs[1]
        self.qids = qids
        self.logger = logger
        self.maxWatches = maxWatches
        thread.start()
        thread.submit { [self] (_: NIOThreadPool.WorkItemState) in run() }
    }

    /// Stops the reader (it closes the descriptors on its way out); no subscriber is called again.
    func stop() {
        lock.withLock { stopped = true; subscribers = [:] }
        Glibc.close(wakeWriter)
        thread.shutdownGracefully { (_: (any Error)?) in }
    }

    /// Adds `deliver`, called on the reader's thread with each batch of changes.
    func subscribe(_ id: ObjectIdentifier, _ deliver: @escaping @Sendable ([P9Note]) -> Void) {
        lock.withLock { subscribers[id] = deliver }
    }

    /// Removes a subscriber; true when none is left.
    func unsubscribe(_ id: ObjectIdentifier) -> Bool {
        lock.withLock {
            subscribers[id] = nil
            return subscribers.isEmpty
        }
    }

    /// Watches directory `node` (before a name is looked up in it, so no change after the lookup
    /// goes unseen). One that cannot be watched is announced as uncached: the guest then caches
    /// nothing in it.
    func watch(_ node: Node) {
        let key = DirKey(dev: node.dev, ino: node.ino)
        if lock.withLock({ byKey[key] != nil || uncached.contains(key) }) { return }
        if lock.withLock({ byKey.count >= maxWatches }) { return cannotWatch(node, key) }
        let wd = "/proc/self/fd/\(node.fd.raw)".withCString { inotify_add_watch(fd, $0, Self.watchMask) }
        guard wd >= 0 else { return cannotWatch(node, key) }
        logger.trace("watching a directory for changes", metadata: ["wd": "\(wd)", "path": "\(qids.path(dev: node.dev, ino: node.ino))"])
        let path = qids.path(dev: node.dev, ino: node.ino)
        lock.withLock {
            // inotify gives an inode one wd, however it was reached: a stale key is replaced.
            if let old = byWd[wd], old.key != key { byKey[old.key] = nil }
            byKey[key] = wd
            byWd[wd] = (key, path)
        }
    }

    /// A directory the guest just made: a cache=meta guest takes it for empty, and knows every
    /// name in it from then on, so it is watched now, and a name a host process put in before
    /// the watch began is announced (the guest then stops counting on knowing all of them).
    func watchNew(_ node: Node) {
        watch(node)
        if let name = HostFS.firstEntry(node.fd) {
            announce([P9Note(.name, path: qids.path(dev: node.dev, ino: node.ino), name: name)])
        }
    }

    private func cannotWatch(_ node: Node, _ key: DirKey) {
        let e = errno
        let (warn, all) = lock.withLock { () -> (Bool, Bool) in
            defer { warnedFull = true }
            // Past the bound the guest drops its whole cache rather than this set growing.
            if uncached.count >= maxWatches { return (!warnedFull, true) }
            uncached.insert(key)
            return (!warnedFull, false)
        }
        if warn { logger.warning("cannot watch directories for changes (\(P9Errno(e))): the guest caches nothing in them") }
        announce([all ? P9Note(.all, path: 0) : P9Note(.uncached, path: qids.path(dev: node.dev, ino: node.ino))])
    }

    /// The guest's own request is about to create, remove or rename `name` in `dir`.
    func expectEntry(in dir: Node, _ name: [UInt8]) {
        let now = Self.now()
        lock.withLock {
            guard let wd = byKey[DirKey(dev: dir.dev, ino: dir.ino)] else { return }
            let k = Expected(wd: wd, name: name)
            expectedNames[k] = ((expectedNames[k]?.count ?? 0) + 1, now + Self.expectFor)
        }
    }

    /// The request failed: the event it expected will not come.
    func unexpectEntry(in dir: Node, _ name: [UInt8]) {
        lock.withLock {
            guard let wd = byKey[DirKey(dev: dir.dev, ino: dir.ino)] else { return }
            let k = Expected(wd: wd, name: name)
            if let e = expectedNames[k] { expectedNames[k] = e.count > 1 ? (e.count - 1, e.until) : nil }
        }
    }

    /// The guest's own request is about to change the attributes of `name` in `dir`; `done`
    /// when it has.
    func expectAttributes(in dir: DirKey, _ name: [UInt8], done: Bool) {
        lock.withLock {
            guard let wd = byKey[dir] else { return }
            var queued: Int32 = 0
            if done { _ = ioctl(fd, UInt(FIONREAD), &queued) }
            expectedAttrs[Expected(wd: wd, name: name)] = done ? .done(reads: readsStarted, queued: UInt64(max(0, queued))) : .running
        }
    }

    /// Sends `notes` to every subscriber at once (an uncached directory, for one).
    func announce(_ notes: [P9Note]) {
        for deliver in lock.withLock({ Array(subscribers.values) }) { deliver(notes) }
    }

    var watchCount: Int { lock.withLock { byKey.count } }

    private static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    private func run() {
        defer {
            Glibc.close(fd)
            Glibc.close(wake)
        }
        let size = 64 << 10
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
        while !lock.withLock({ stopped }) {
            let rc = poll(&fds, 2, -1)
            if rc < 0 && errno == EINTR { continue }
            if rc < 0 || fds[1].revents != 0 { return }
            let index = lock.withLock { () -> UInt64 in readsStarted += 1; return readsStarted }
            let n = read(fd, buffer, size)
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                logger.error("change watch failed: \(P9Errno(errno)); the guest's cache is dropped")
                announce([P9Note(.all, path: 0)])
                return
            }
            let notes = translate(UnsafeRawBufferPointer(start: buffer, count: n), read: index)
            logger.trace("change notes", metadata: ["events": "\(n) bytes", "notes": "\(notes.map { "\($0.kind) \($0.path) \(String(decoding: $0.name, as: UTF8.self))" })"])
            if !notes.isEmpty { announce(notes) }
        }
    }

    /// inotify events to notes: the guest's own changes left out, repeats merged, order kept.
    private func translate(_ bytes: UnsafeRawBufferPointer, read index: UInt64) -> [P9Note] {
        var notes: [P9Note] = []
        var seen = Set<P9Note>()
        let now = Self.now()
        lock.withLock {
            let base = consumed
            consumed += UInt64(bytes.count)
            // Requests done before this read started: their events end `queued` bytes from here.
            for (k, w) in expectedAttrs {
                if case .done(let reads, let queued) = w, reads < index { expectedAttrs[k] = .until(base + queued) }
            }
            var at = 0
            while at + 16 <= bytes.count {
                let wd = bytes.loadUnaligned(fromByteOffset: at, as: Int32.self)
                let mask = bytes.loadUnaligned(fromByteOffset: at + 4, as: UInt32.self)
                let len = Int(bytes.loadUnaligned(fromByteOffset: at + 12, as: UInt32.self))
                guard at + 16 + len <= bytes.count else { break }
                var name = Array(bytes[(at + 16)..<(at + 16 + len)])
                if let nul = name.firstIndex(of: 0) { name.removeSubrange(nul...) }
                at += 16 + len
                if mask & Self.overflow != 0 {
                    notes.append(P9Note(.all, path: 0))
                    continue
                }
                guard let dir = byWd[wd] else { continue }
                if mask & Self.ignored != 0 {
                    byWd[wd] = nil
                    if byKey[dir.key] == wd { byKey[dir.key] = nil }
                    continue
                }
                let note: P9Note
                if name.isEmpty {
                    guard mask & Self.attrMask != 0 else { continue }
                    note = P9Note(.selfAttr, path: dir.path)
                } else if mask & Self.entryMask != 0 {
                    let k = Expected(wd: wd, name: name)
                    if let e = expectedNames[k] {
                        expectedNames[k] = e.count > 1 ? (e.count - 1, e.until) : nil
                        if e.until > now { continue }
                    }
                    note = P9Note(.name, path: dir.path, name: name)
                } else if mask & Self.attrMask != 0 {
                    // `at` is already past this event: its position is its start, before that.
                    switch expectedAttrs[Expected(wd: wd, name: name)] {
                    case .running?, .done?: continue  // a read that started before the request was done
                    case .until(let end)? where base + UInt64(at - 16 - len) < end: continue
                    default: break
                    }
                    note = P9Note(.attr, path: dir.path, name: name)
                } else {
                    continue
                }
                if seen.insert(note).inserted { notes.append(note) }
            }
            if expectedNames.count > 64 { expectedNames = expectedNames.filter { $0.value.until > now } }
            if expectedAttrs.count > 64 {
                expectedAttrs = expectedAttrs.filter { if case .until(let end) = $0.value { return end > consumed } else { return true } }
            }
        }
        return notes
    }
}
