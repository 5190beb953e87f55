import Foundation
import Glibc
import NIOCore
import Testing

@testable import Plan9

/// Zero copy (P9ZeroCopy.swift): Tzc requests name guest-physical pages, which the server reads
/// and writes in place. The fake guest RAM is Plan9Fuzz's: 64 KiB at 0, 64 KiB at 4 GiB.
@Suite("Zero copy", .serialized)
struct ZeroCopyTests {
    static let memory = Plan9Fuzz.makeGuestMemory()
    static let high: UInt64 = 1 << 32

    static func bytes(at gpa: UInt64, _ count: Int) -> [UInt8] {
        let p = memory.translate(gpa: gpa, length: UInt64(count))!
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }

    static func fill(at gpa: UInt64, _ data: [UInt8]) {
        let p = memory.translate(gpa: gpa, length: UInt64(data.count))!
        data.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: data.count) }
    }

    @Test func q35SplitFollowsQEMU() {
        #expect(GuestMemory.q35LowSize(ramSize: 2 << 30) == 2 << 30)
        #expect(GuestMemory.q35LowSize(ramSize: 0xafff_f000) == 0xafff_f000)
        #expect(GuestMemory.q35LowSize(ramSize: 0xb000_0000) == 0x8000_0000)
        #expect(GuestMemory.q35LowSize(ramSize: 4 << 30) == 0x8000_0000)
        #expect(GuestMemory.q35LowSize(ramSize: 16 << 30) == 0x8000_0000)
    }

    @Test func translateAcceptsOnlyRAM() {
        let m = Self.memory
        #expect(m.offset(gpa: 0, length: 4096) == 0)
        #expect(m.offset(gpa: 0xF000, length: 4096) == 0xF000)
        #expect(m.offset(gpa: 0xF000, length: 4097) == nil)           // runs into the hole
        #expect(m.offset(gpa: 0x10000, length: 1) == nil)             // the hole
        #expect(m.offset(gpa: Self.high - 4096, length: 4096) == nil)  // top of the hole
        #expect(m.offset(gpa: Self.high, length: 4096) == 0x10000)
        #expect(m.offset(gpa: Self.high + 0xF000, length: 4096) == 0x1F000)
        #expect(m.offset(gpa: Self.high + 0xF000, length: 4097) == nil)  // past the end
        #expect(m.offset(gpa: UInt64.max - 4095, length: 4096) == nil)   // at the very top
        #expect(m.offset(gpa: UInt64.max - 10, length: 4096) == nil)     // wraps around
        #expect(m.offset(gpa: 0, length: 0) == nil)
        #expect(m.offset(gpa: 0, length: UInt64.max) == nil)
    }

    static func tzc(_ op: UInt8, fid: UInt32, offset: UInt64 = 0, count: UInt32, first: UInt32 = 0,
                    pages: [UInt64], declared: UInt32? = nil, trailing: Int = 0) -> P9Message {
        .tzc(P9ZeroCopyRequest(op: op, fid: fid, offset: offset, count: count, first: first, pages: pages,
                               declaredPages: declared, trailing: trailing))
    }

    /// A cache=meta guest is not told of its own zero-copy writes (which would cost it a getattr
    /// after every write of more than a page).
    @Test func zeroCopyWritesAreNotEchoedAsChangeNotes() async throws {
        let fx = try Fixture(guestMemory: Self.memory)
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        #expect(try await c.call(.tuvmnotify(flags: 0)) == .ruvmnotify(notes: []))
        let root = UInt64(try lstatOf(fx.share).st_ino)
        try await c.walk(0, 1, [])
        try await c.lcreate(1, "mine", flags: P9.OpenFlags.rdwr)
        Self.fill(at: 0x5000, Array(repeating: 0x41, count: 8192))
        for i in 0..<3 {
            let w = try await c.call(Self.tzc(P9ZeroCopyRequest.Op.write, fid: 1, offset: UInt64(i) * 8192, count: 8192,
                                               pages: [0x5000, 0x6000]))
            #expect(w == .rwrite(count: 8192))
        }
        try await c.clunk(1)
        // Then a host change: once its note is here, an echo of the writes would be too.
        FileManager.default.createFile(atPath: fx.share + "/host", contents: Data("h".utf8))
        var got: [P9Note] = []
        let want = P9Note(.name, path: root, name: Array("host".utf8))
        let deadline = Date().addingTimeInterval(10)
        while !got.contains(want), Date() < deadline {
            got += c.takeNotes()
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(got.contains(want), "no note for the host's change: \(got)")
        let echoed = got.filter { $0.name == Array("mine".utf8) }
        #expect(echoed.isEmpty, "the client's own zero-copy writes came back: \(echoed)")
    }

    @Test func writeReadAndReaddirInPlace() async throws {
        let fx = try Fixture(guestMemory: Self.memory) { share, _ in try FileManager.default.createDirectory(atPath: share + "/d", withIntermediateDirectories: true) }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        // 6000 bytes from the middle of a low page into a high page: two pages, not adjacent.
        let data = (0..<6000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        Self.fill(at: 0x3000 + 100, Array(data[0..<3996]))
        Self.fill(at: Self.high + 0x2000, Array(data[3996...]))
        try await c.walk(0, 1, [])
        try await c.lcreate(1, "f", flags: P9.OpenFlags.rdwr)
        let w = try await c.call(Self.tzc(P9ZeroCopyRequest.Op.write, fid: 1, count: 6000, first: 100,
                                           pages: [0x3000, Self.high + 0x2000]))
        #expect(w == .rwrite(count: 6000))
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: fx.share + "/f"))) == data)

        // Read it back into two other pages, adjacent this time (one iovec).
        let r = try await c.call(Self.tzc(P9ZeroCopyRequest.Op.read, fid: 1, offset: 10, count: 8192,
                                           pages: [Self.high + 0x8000, Self.high + 0x9000]))
        #expect(r == .rzc(type: 117, count: 5990))
        #expect(Self.bytes(at: Self.high + 0x8000, 5990) == Array(data[10...]))

        // Readdir through the ordinary op, copied into the page.
        try await c.walk(0, 2, [])
        try await c.lopen(2, P9.OpenFlags.directory)
        let d = try await c.call(Self.tzc(P9ZeroCopyRequest.Op.readdir, fid: 2, count: 4096, pages: [0x5000]))
        guard case .rzc(41, let n) = d else { Issue.record("\(d)"); return }
        var buf = ByteBuffer(bytes: Self.bytes(at: 0x5000, Int(n)))
        let names = try P9DirEntry.parse(buf.readSlice(length: Int(n))!).map(\.name.description)
        #expect(Set(names).isSuperset(of: ["f", "d"]))
    }

    /// Each hostile list gets its error, and the session answers the next request as before.
    static let hostile: [(String, P9Message, Int32)] = {
        let r = P9ZeroCopyRequest.Op.read, w = P9ZeroCopyRequest.Op.write
        var own = [UInt8](repeating: 0, count: 8)
        let hostAddress = UInt64(UInt(bitPattern: own.withUnsafeMutableBytes { $0.baseAddress! })) & ~0xFFF
        let base = UInt64(UInt(bitPattern: memory.base))
        return [
            ("outside RAM, low", tzc(r, fid: 1, count: 100, pages: [0x100000]), EFAULT),
            ("in the hole", tzc(r, fid: 1, count: 100, pages: [0x8000_0000]), EFAULT),
            ("just below 4 GiB", tzc(w, fid: 1, count: 100, pages: [high - 4096]), EFAULT),
            ("past the end of high RAM", tzc(w, fid: 1, count: 100, pages: [high + 0x10000]), EFAULT),
            ("one good page, one outside", tzc(r, fid: 1, count: 5000, pages: [0x1000, 0x7000_0000]), EFAULT),
            ("wraparound", tzc(r, fid: 1, count: 8192, pages: [UInt64.max & ~0xFFF, 0]), EFAULT),
            ("uvmd's own memory by address", tzc(r, fid: 1, count: 100, pages: [hostAddress]), EFAULT),
            ("uvmd's memory past the mapping", tzc(w, fid: 1, count: 100,
                                                  pages: [(hostAddress &- base) & ~0xFFF]), EFAULT),
            ("count 0", tzc(r, fid: 1, count: 0, pages: []), EINVAL),
            ("count huge", tzc(r, fid: 1, count: .max, pages: [0x1000]), EINVAL),
            ("npages huge", tzc(r, fid: 1, count: 100, pages: [0x1000], declared: .max), EINVAL),
            ("more pages than msize needs", tzc(r, fid: 1, count: 4096,
                                               pages: Array(repeating: 0x1000, count: 300)), EINVAL),
            ("count longer than the pages", tzc(r, fid: 1, count: 8192, pages: [0x1000]), EINVAL),
            ("count shorter than the pages", tzc(w, fid: 1, count: 100, pages: [0x1000, 0x2000]), EINVAL),
            ("first outside the page", tzc(r, fid: 1, count: 100, first: 4096, pages: [0x1000, 0x2000]), EINVAL),
            ("unaligned page", tzc(r, fid: 1, count: 100, pages: [0x1001]), EINVAL),
            ("trailing bytes", tzc(r, fid: 1, count: 100, pages: [0x1000], trailing: 3), EINVAL),
            ("unknown op", tzc(12, fid: 1, count: 100, pages: [0x1000]), EINVAL),
            ("unknown fid", tzc(r, fid: 99, count: 100, pages: [0x1000]), EBADF),
        ]
    }()

    @Test("hostile page lists are refused and the session goes on", arguments: 0..<hostile.count)
    func hostilePageList(_ index: Int) async throws {
        let (name, message, code) = Self.hostile[index]
        let fx = try Fixture(guestMemory: Self.memory) { share, _ in try write(share + "/f", "0123456789") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1, P9.OpenFlags.rdwr)
        let before = Self.bytes(at: 0, Int(Plan9Fuzz.guestRAMLow))
        await #expect(throws: P9Errno(code), "\(name)") { try await c.call(message) }
        // Nothing was read into or written from guest memory, nor the file changed.
        #expect(Self.bytes(at: 0, Int(Plan9Fuzz.guestRAMLow)) == before, "\(name)")
        #expect(try await c.read(1) == Array("0123456789".utf8), "\(name)")
    }

    @Test func withoutGuestMemoryTzcIsNotSupported() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "x") }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1)
        await #expect(throws: P9Errno(EOPNOTSUPP)) {
            try await c.call(Self.tzc(P9ZeroCopyRequest.Op.read, fid: 1, count: 1, pages: [0x1000]))
        }
        #expect(try await c.read(1) == Array("x".utf8))
    }

    @Test func msizeAllowsOneMebibyteOfData() async throws {
        let fx = try Fixture(guestMemory: Self.memory)
        defer { Task { await fx.close() } }
        let (c, _) = try await fx.connectRaw()
        #expect(try await c.version(msize: P9.zeroCopyMaxMsize) == P9.zeroCopyMaxMsize)
        let plain = try Fixture()
        defer { Task { await plain.close() } }
        let (p, _) = try await plain.connectRaw()
        #expect(try await p.version(msize: P9.zeroCopyMaxMsize) == P9.maxMsize)
    }
}
