import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import Plan9

/// A temporary tree: `share/` is exported, `outside/` holds canaries the guest must never reach.
final class Fixture: @unchecked Sendable {
    let base: String
    let share: String
    let outside: String
    let server: Plan9Server
    private var tasks: [Task<Void, any Error>] = []
    private var clients: [Plan9Client] = []

    init(readOnly: Bool = false, metadata: Bool = false, threadPool: NIOThreadPool? = nil,
         gate: Gate? = nil, limits: SessionLimits = SessionLimits(), guestMemory: GuestMemory? = nil,
         setup: (String, String) throws -> Void = { _, _ in }) throws {
        var template = Array("/tmp/plan9-test-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw P9Errno(errno) }
        base = String(cString: p)
        Fixture.removeAtExit(base)
        share = base + "/share"
        outside = base + "/outside"
        try FileManager.default.createDirectory(atPath: share, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try setup(share, outside)
        var logger = Logger(label: "plan9-test")
        logger.logLevel = .critical
        server = try Plan9Server(export: Plan9Export(root: share, readOnly: readOnly, metadata: metadata),
                                 threadPool: threadPool, logger: logger, limits: limits, beforeHandle: gate?.hook,
                                 guestMemory: guestMemory)
    }

    /// A new session over a socketpair, negotiated and attached as fid 0.
    func connect(msize: UInt32 = P9.maxMsize, attach: Bool = true) async throws -> Plan9Client {
        let (a, b) = try socketPair()
        let server = self.server
        tasks.append(Task { try await server.serve(connectedSocket: a) })
        let client = try await Plan9Client.connect(socket: b)
        clients.append(client)
        _ = try await client.version(msize: msize)
        if attach { try await client.attach(fid: 0) }
        return client
    }

    /// A raw session: the test drives the bytes. Returns the client and the server task.
    func connectRaw() async throws -> (Plan9Client, Task<Void, any Error>) {
        let (a, b) = try socketPair()
        let server = self.server
        let task = Task { try await server.serve(connectedSocket: a) }
        tasks.append(task)
        let client = try await Plan9Client.connect(socket: b)
        clients.append(client)
        return (client, task)
    }

    /// Fixtures are closed from detached tasks that may not run before the test process exits;
    /// whatever is left is removed then.
    private static let leftovers = NIOLockedValueBox<[String]>([])
    private static func removeAtExit(_ dir: String) {
        let first = leftovers.withLockedValue { list in
            list.append(dir)
            return list.count == 1
        }
        if first {
            atexit {
                for d in Fixture.leftovers.withLockedValue({ $0 }) { try? FileManager.default.removeItem(atPath: d) }
            }
        }
    }

    func close() async {
        for c in clients { await c.close() }
        for t in tasks { _ = try? await t.value }
        try? await server.shutdown()
        _ = try? FileManager.default.removeItem(atPath: base)
    }
}

func socketPair() throws -> (CInt, CInt) {
    var fds: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw P9Errno(errno) }
    return (fds[0], fds[1])
}

func write(_ path: String, _ text: String) throws {
    try Data(text.utf8).write(to: URL(fileURLWithPath: path))
}

func contents(_ path: String) throws -> String {
    String(decoding: try Data(contentsOf: URL(fileURLWithPath: path)), as: UTF8.self)
}

func lstatOf(_ path: String) throws -> stat {
    var st = stat()
    guard lstat(path, &st) == 0 else { throw P9Errno(errno) }
    return st
}

extension Plan9Client {
    @discardableResult
    func walk(_ fid: UInt32, _ newfid: UInt32, _ names: [String]) async throws -> [Qid] {
        let r = try await call(.twalk(fid: fid, newfid: newfid, names: names.map { P9String($0) }))
        guard case .rwalk(let q) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return q
    }

    @discardableResult
    func lopen(_ fid: UInt32, _ flags: UInt32 = P9.OpenFlags.rdonly) async throws -> Qid {
        let r = try await call(.tlopen(fid: fid, flags: flags))
        guard case .rlopen(let q, _) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return q
    }

    @discardableResult
    func lcreate(_ fid: UInt32, _ name: String, flags: UInt32 = P9.OpenFlags.rdwr, mode: UInt32 = 0o644,
                 gid: UInt32 = 0) async throws -> Qid {
        let r = try await call(.tlcreate(fid: fid, name: P9String(name), flags: flags, mode: mode, gid: gid))
        guard case .rlcreate(let q, _) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return q
    }

    func read(_ fid: UInt32, offset: UInt64 = 0, count: UInt32 = 65536) async throws -> [UInt8] {
        let r = try await call(.tread(fid: fid, offset: offset, count: count))
        guard case .rread(let d) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return Array(d.readableBytesView)
    }

    @discardableResult
    func write(_ fid: UInt32, offset: UInt64 = 0, _ bytes: [UInt8]) async throws -> UInt32 {
        let r = try await call(.twrite(fid: fid, offset: offset, data: ByteBuffer(bytes: bytes)))
        guard case .rwrite(let n) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return n
    }

    func clunk(_ fid: UInt32) async throws {
        try await call(.tclunk(fid: fid))
    }

    func getattr(_ fid: UInt32) async throws -> P9Attr {
        let r = try await call(.tgetattr(fid: fid, mask: P9.GetattrMask.all))
        guard case .rgetattr(let a) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return a
    }

    func setattr(_ fid: UInt32, _ a: P9SetAttr) async throws {
        try await call(.tsetattr(fid: fid, attr: a))
    }

    @discardableResult
    func mkdir(_ dfid: UInt32, _ name: String, mode: UInt32 = 0o755) async throws -> Qid {
        let r = try await call(.tmkdir(dfid: dfid, name: P9String(name), mode: mode, gid: 0))
        guard case .rmkdir(let q) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return q
    }

    func readdir(_ fid: UInt32, offset: UInt64, count: UInt32) async throws -> (entries: [P9DirEntry], bytes: Int) {
        let r = try await call(.treaddir(fid: fid, offset: offset, count: count))
        guard case .rreaddir(let d) = r else { throw Plan9ClientError.malformedReply("\(r)") }
        return (try P9DirEntry.parse(d), d.readableBytes)
    }

    /// Reads a whole directory the way the Linux client does: each call starts at the last offset.
    func readdirAll(_ fid: UInt32, count: UInt32 = 8192) async throws -> (entries: [P9DirEntry], calls: Int) {
        var all: [P9DirEntry] = []
        var offset: UInt64 = 0
        var calls = 0
        while true {
            let (entries, bytes) = try await readdir(fid, offset: offset, count: count)
            calls += 1
            #expect(bytes <= Int(count))
            guard let last = entries.last else { break }
            all += entries
            offset = last.offset
        }
        return (all, calls)
    }

    func names(_ dirFid: UInt32, newfid: UInt32, _ path: [String] = []) async throws -> Set<String> {
        try await walk(dirFid, newfid, path)
        try await lopen(newfid, P9.OpenFlags.rdonly | P9.OpenFlags.directory)
        let (entries, _) = try await readdirAll(newfid)
        try await clunk(newfid)
        return Set(entries.map(\.name.description)).subtracting([".", ".."])
    }
}

extension P9Errno {
    static let enoent = P9Errno(ENOENT)
}
