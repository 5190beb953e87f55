import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The fuzz target: an input is a byte stream from a client (concatenated 9P messages), run
/// through the frame and message decoders and a session against a scratch export. Crashes, a reply
/// of msize bytes or more, or any change to a canary file outside the export are findings.
///
/// The session runs synchronously (no event loop, no pool) so that runs are deterministic; the
/// NIO handler's own logic (framing, tags, Tflush) is covered by the tests.
public enum Plan9Fuzz {
    /// The tree every run starts from; the seed corpus names these entries.
    public static func populate(share: String, outside: String) {
        func file(_ path: String, _ text: String) {
            let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o644)
            if fd >= 0 {
                _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
                close(fd)
            }
        }
        mkdir(share, 0o755)
        mkdir(outside, 0o755)
        mkdir(share + "/dir", 0o755)
        mkdir(share + "/dir/sub", 0o755)
        file(share + "/file", "hello 9p\n")
        file(share + "/dir/inner", "inner\n")
        symlink("/etc", share + "/etc")
        symlink("../outside/canary", share + "/escape")
        symlink("dir/inner", share + "/rel")
        mkfifo(share + "/fifo", 0o644)
        file(outside + "/canary", "canary\n")
    }

    /// The fake guest RAM zero-copy requests (Tzc) name in the fuzz target and its seeds: 64 KiB
    /// at guest-physical 0, then 64 KiB at 4 GiB (a q35-like split with a hole in between).
    public static let guestRAMLow: UInt64 = 64 << 10
    public static let guestRAMSize: UInt64 = 128 << 10

    /// A fresh fake guest RAM of that layout (never freed: the fuzz process keeps one).
    public static func makeGuestMemory() -> GuestMemory {
        let p = mmap(nil, Int(guestRAMSize), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        return GuestMemory(unownedBase: p, size: guestRAMSize, lowSize: guestRAMLow)
    }

    public static func testOneInput(_ data: UnsafeRawBufferPointer) -> Int32 {
        FuzzState.shared.withLockedValue { $0.run(data) }
        return 0
    }
}

/// Scratch export and canary, made once per process.
struct FuzzState: Sendable {
    static let shared = NIOLockedValueBox(FuzzState())
    static let memory = Plan9Fuzz.makeGuestMemory()

    let base: String
    let share: String
    let outside: String
    var cores: [ExportCore] = []
    var canary = stat()
    var runs = 0

    init() {
        var template = Array("/tmp/uvm-9p-fuzz-XXXXXX".utf8CString)
        let p = mkdtemp(&template)!
        base = String(cString: p)
        share = base + "/share"
        outside = base + "/outside"
        reset()
    }

    mutating func reset() {
        // Remove whatever the previous runs made, then start from the known tree.
        FuzzState.removeTree(AT_FDCWD, share)
        FuzzState.removeTree(AT_FDCWD, outside)
        Plan9Fuzz.populate(share: share, outside: outside)
        lstat(outside + "/canary", &canary)
        cores = [Plan9Export(root: share), Plan9Export(root: share, metadata: true),
                 Plan9Export(root: share, readOnly: true)].map { try! ExportCore(export: $0) }
    }

    /// Small enough that an input of at most 64 KiB can run into each of them.
    static let limits: SessionLimits = {
        var l = SessionLimits()
        l.fids = 256
        l.descriptors = 64
        l.xattrBytes = 256 * 1024
        return l
    }()

    mutating func run(_ data: UnsafeRawBufferPointer) {
        runs += 1
        if runs % 2000 == 0 { reset() }
        let core = cores[data.count % cores.count]
        let session = Plan9Session(core: core, limits: FuzzState.limits, memory: FuzzState.memory)
        let subscriber = ObjectIdentifier(session)
        defer {
            session.close()
            if session.changes.withLockedValue({ $0 }) != nil { core.unsubscribeChanges(subscriber) }
        }
        var stream = ByteBuffer(bytes: data)
        var msize = Int(P9.minMsize)
        var negotiated = false
        while let size = stream.getInteger(at: stream.readerIndex, endianness: .little, as: UInt32.self) {
            // What the connection does: bad sizes end the session.
            guard size >= UInt32(P9.headerSize), size <= UInt32(max(msize, Int(P9.minMsize))),
                  let frame = stream.readSlice(length: Int(size)) else { break }
            guard let f = try? P9Frame.decode(frame) else { break }
            let reply: P9Message
            switch f.message {
            case .tversion(let m, let v):
                // As the connection handler: only a 9P2000.L answer makes a session.
                reply = session.version(msize: m, version: v)
                negotiated = false
                if case .rversion(let agreed, let version) = reply, version.bytes == Array(P9.version.utf8) {
                    msize = Int(agreed)
                    negotiated = true
                }
            case _ where !negotiated:
                return
            case .tflush:
                reply = .rflush
            case .tuvmnotify:
                // As the connection handler: watches and expectations follow, notes are dropped.
                if session.changes.withLockedValue({ $0 }) == nil,
                   let w = try? core.subscribeChanges(subscriber, logger: Logger(label: "fuzz"), maxWatches: 64, { _ in }) {
                    session.changes.withLockedValue { $0 = w }
                }
                reply = .ruvmnotify(notes: [])
            case let m where m.typeCode & 1 == 1:
                return
            case let m:
                reply = session.handle(m)
            }
            let out = P9Frame(tag: f.tag, message: reply)
            if out.encodedSize >= msize && reply.typeCode != 101 {
                fatalError("reply \(reply.typeCode) of \(out.encodedSize) bytes with msize \(msize)")
            }
            // Replies must decode with our own codec.
            var b = ByteBuffer()
            out.encode(into: &b)
            guard (try? P9Frame.decode(b)) != nil else { fatalError("reply does not decode: \(reply)") }
        }
        checkCanary()
    }

    /// rm -rf without following symlinks (the fuzzer makes plenty pointing anywhere).
    static func removeTree(_ dirfd: Int32, _ name: String) {
        if unlinkat(dirfd, name, 0) == 0 || errno == ENOENT { return }
        let fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd >= 0, let d = fdopendir(fd) {
            var names: [String] = []
            while let e = readdir(d) {
                let n = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if n != "." && n != ".." { names.append(n) }
            }
            for n in names { removeTree(fd, n) }
            closedir(d)
        }
        unlinkat(dirfd, name, AT_REMOVEDIR)
    }

    func checkCanary() {
        var now = stat()
        let r = lstat(outside + "/canary", &now)
        guard r == 0, now.st_ino == canary.st_ino, now.st_size == canary.st_size,
              now.st_mtim.tv_sec == canary.st_mtim.tv_sec, now.st_mtim.tv_nsec == canary.st_mtim.tv_nsec,
              now.st_mode == canary.st_mode, now.st_nlink == canary.st_nlink else {
            fatalError("the canary outside the export changed")
        }
        var entries = 0
        if let d = opendir(outside) {
            while readdir(d) != nil { entries += 1 }
            closedir(d)
        }
        if entries != 3 { fatalError("something was created outside the export") }
    }
}
