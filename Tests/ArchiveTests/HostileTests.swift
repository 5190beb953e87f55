import Foundation
import Glibc
import Testing

@testable import Archive

/// Hand-made tar pieces for archives no honest writer produces.
enum Forge {
    static func header(_ name: String, type: UInt8 = Tar.TypeFlag.regular, size: UInt64 = 0, link: String = "",
                       mode: UInt64 = 0o644, sizeField: String? = nil) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        Tar.putString(&h, Tar.name, Array(name.utf8))
        Tar.putNumber(&h, Tar.mode, mode)
        Tar.putNumber(&h, Tar.size, size)
        if let sizeField { Tar.putString(&h, Tar.size, Array(sizeField.utf8) + [0]) }
        Tar.putNumber(&h, Tar.mtime, 1_700_000_000)
        h[Tar.typeflag] = type
        Tar.putString(&h, Tar.linkname, Array(link.utf8))
        Tar.putString(&h, Tar.magic, Array("ustar\0".utf8))
        Tar.putString(&h, Tar.version, Array("00".utf8))
        Tar.sealChecksum(&h)
        return h
    }

    static func padded(_ data: [UInt8]) -> [UInt8] { data + [UInt8](repeating: 0, count: Tar.padding(UInt64(data.count))) }

    static func file(_ name: String, _ data: String = "data\n") -> [UInt8] {
        header(name, size: UInt64(data.utf8.count)) + padded(Array(data.utf8))
    }
    static func symlink(_ name: String, to target: String) -> [UInt8] { header(name, type: Tar.TypeFlag.symlink, link: target) }
    static func hardLink(_ name: String, to target: String) -> [UInt8] { header(name, type: Tar.TypeFlag.hardLink, link: target) }
    static func pax(_ records: [UInt8]) -> [UInt8] {
        header("PaxHeaders/x", type: Tar.TypeFlag.paxLocal, size: UInt64(records.count)) + padded(records)
    }
    static let end = [UInt8](repeating: 0, count: 1024)
}

@Suite struct HostileTests {
    /// A destination with an `outside` sibling that holds a file nothing may change.
    struct Scene {
        let tmp = TempDir("hostile")
        var dst: String { tmp.path + "/dst" }
        var outside: String { tmp.path + "/outside" }
        init() throws {
            _ = tmp.sub("dst")
            _ = tmp.sub("outside")
            try Data("secret\n".utf8).write(to: URL(fileURLWithPath: outside + "/secret"))
        }
        func exists(_ p: String) -> Bool { var st = stat(); return lstat(p, &st) == 0 }
        /// Only `secret` is outside, unchanged; and nothing appeared next to dst.
        func outsideUntouched() throws -> Bool {
            let names = try FileManager.default.contentsOfDirectory(atPath: outside)
            let top = try FileManager.default.contentsOfDirectory(atPath: tmp.path).sorted()
            let secret = try String(contentsOfFile: outside + "/secret", encoding: .utf8)
            return names == ["secret"] && secret == "secret\n" && top == ["dst", "outside"]
        }
    }

    func expectError(_ bytes: [UInt8], _ s: Scene, containing: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let e = #expect(throws: ArchiveError.self, sourceLocation: sourceLocation) { try extract(bytes, to: s.dst) }
        if getenv("ARCHIVE_TEST_VERBOSE") != nil, let e { print("error: \(e)") }
        #expect(e?.description.contains(containing) == true, "\(e.map { "\($0)" } ?? "no error")", sourceLocation: sourceLocation)
        #expect(try s.outsideUntouched(), sourceLocation: sourceLocation)
    }

    @Test func dotDotIsRefused() throws {
        for name in ["../x", "a/../../x", "./../outside/secret"] {
            let s = try Scene()
            try expectError(Forge.file(name) + Forge.end, s, containing: "'..'")
        }
    }

    @Test func absoluteNamesLandInside() throws {
        let s = try Scene()
        let abs = s.outside + "/secret"
        let pax = Forge.pax(Tar.paxRecord("path", s.outside + "/viapax"))
        try extract(Forge.file(abs, "pwned\n") + pax + Forge.file("ignored") + Forge.end, to: s.dst)
        #expect(try s.outsideUntouched())
        #expect(try String(contentsOfFile: s.dst + abs, encoding: .utf8) == "pwned\n")
        #expect(s.exists(s.dst + s.outside + "/viapax"))
    }

    /// Every escape aims at the scene's `outside` directory, never at a real system path: were
    /// the confinement to break, only the test's own temporary files would be touched.
    @Test func symlinksMadeByTheArchiveAreNotFollowed() throws {
        let cases: [(String) -> [UInt8]] = [
            { out in Forge.symlink("a", to: "/") + Forge.file("a" + out + "/x") },
            { out in Forge.symlink("a", to: out) + Forge.file("a/x") },
            { _ in Forge.symlink("a", to: "../outside") + Forge.file("a/x") },
            { _ in Forge.header("d/", type: Tar.TypeFlag.directory) + Forge.symlink("d/l", to: "../../outside") + Forge.file("d/l/x") },
            { _ in Forge.symlink("a", to: "../outside") + Forge.header("a/sub/", type: Tar.TypeFlag.directory) },
            { _ in Forge.symlink("a", to: "../outside") + Forge.hardLink("h", to: "a/secret") },
            { out in Forge.symlink("a", to: out) + Forge.symlink("a/l", to: "x") },
        ]
        for c in cases {
            let s = try Scene()
            try expectError(c(s.outside) + Forge.end, s, containing: "refusing to go through it")
        }
    }

    @Test func aFileReplacesASymlinkInsteadOfWritingThroughIt() throws {
        let s = try Scene()
        try extract(Forge.symlink("evil", to: s.outside + "/secret") + Forge.file("evil", "pwned\n") + Forge.end, to: s.dst)
        #expect(try s.outsideUntouched())
        #expect(try String(contentsOfFile: s.dst + "/evil", encoding: .utf8) == "pwned\n")
        var st = stat()
        #expect(lstat(s.dst + "/evil", &st) == 0 && st.st_mode & S_IFMT == S_IFREG)
    }

    @Test func hardLinksCannotReachOutside() throws {
        for target in ["../../outside/secret", "../outside/secret", "/../outside/secret"] {
            let s = try Scene()
            try expectError(Forge.hardLink("h", to: target) + Forge.end, s, containing: "'..'")
            #expect(!s.exists(s.dst + "/h"))
        }
        // An absolute target is taken inside the root too: there is no such file there.
        let s = try Scene()
        try expectError(Forge.hardLink("h", to: s.outside + "/secret") + Forge.end, s, containing: "No such file")
    }

    @Test func truncatedArchivesAreErrors() throws {
        let tmp = TempDir("trunc")
        let src = tmp.sub("src")
        try buildTree(src, privileged: false, sparseSize: 64 << 20)
        let (bytes, _) = try archive(src)
        let n = bytes.count
        for cut in [0, 1, 100, 511, 512, 513, 1000, 1536, n / 3, n / 2, n - 2000, n - 1025, n - 1024] {
            let dst = tmp.path + "/dst\(cut)"
            mkdir(dst, 0o755)
            let e = #expect(throws: ArchiveError.self, "cut at \(cut) of \(n)") { try extract(Array(bytes[..<cut]), to: dst) }
            #expect(e?.description.contains("truncated") == true, "\(e.map { "\($0)" } ?? "")")
        }
        // One end block is enough (some writers stop there); everything is there.
        let dst = tmp.sub("one-end-block")
        try extract(Array(bytes[..<(n - 512)]), to: dst)
    }

    @Test func corruptHeadersNameTheEntryAndOffset() throws {
        let s = try Scene()
        var bytes = Forge.file("first") + Forge.file("second") + Forge.end
        bytes[1024 + 3] ^= 0x20  // a byte of the second entry's name
        let e = #expect(throws: ArchiveError.self) { try extract(bytes, to: s.dst) }
        #expect(e?.offset == 1024)
        #expect(e?.description.contains("checksum mismatch") == true)
        #expect(s.exists(s.dst + "/first"))

        let s2 = try Scene()
        let e2 = #expect(throws: ArchiveError.self) { try extract(Forge.header("f", sizeField: "12x4") + Forge.end, to: s2.dst) }
        #expect(e2?.description == "entry 'f' at byte 0: size field does not parse")
    }

    @Test func absurdSizesAndBadPaxRecordsAreErrors() throws {
        let cases: [(bytes: [UInt8], message: String)] = [
            // An extended header claiming a terabyte: refused before any allocation.
            (Forge.header("PaxHeaders/x", type: Tar.TypeFlag.paxLocal, size: 1 << 40), "larger than"),
            (Forge.header("././@LongLink", type: Tar.TypeFlag.gnuLongName, size: 1 << 30), "larger than"),
            (Forge.pax(Array("99 path=x\n".utf8)) + Forge.file("f"), "more than the header holds"),
            (Forge.pax(Array("5 path=x\n".utf8)) + Forge.file("f"), "wrong length"),
            (Forge.pax(Array("path=x\n".utf8)) + Forge.file("f"), "does not start with a length"),
            (Forge.pax(Tar.paxRecord("size", "99999999999999999999999")) + Forge.file("f"), "does not parse"),
            (Forge.pax(Tar.paxRecord("size", String(UInt64(1) << 60))) + Forge.file("f"), "absurd"),
            (Forge.pax(Tar.paxRecord("mtime", "12.3x")) + Forge.file("f"), "mtime"),
            (Forge.pax(Tar.paxRecord("uid", "99999999999")) + Forge.file("f"), "out of range"),
            (Forge.pax(Tar.paxRecord("GNU.sparse.major", "1") + Tar.paxRecord("GNU.sparse.realsize", "100"))
                + Forge.header("s", size: 512) + Forge.padded(Array("1\n0\n999\n".utf8)), "sparse map"),
            (Forge.pax(Array((0..<2000).map { _ in Tar.paxRecord("SCHILY.xattr.user.\(UInt32.random(in: 0...UInt32.max))", "v") }.joined()))
                + Forge.file("f"), "xattrs in one entry"),
        ]
        for c in cases {
            let s = try Scene()
            try expectError(c.bytes + Forge.end, s, containing: c.message)
        }
    }

    @Test func afterAnErrorTheExtractorRefusesMore() throws {
        let s = try Scene()
        let x = try TarExtractor(destination: s.dst)
        #expect(throws: ArchiveError.self) { try x.feed(Forge.file("../x")) }
        #expect(throws: ArchiveError.self) { try x.feed(Forge.file("ok")) }
        #expect(throws: ArchiveError.self) { try x.finish() }
        #expect(!s.exists(s.dst + "/ok"))
    }

    @Test func chunkSizeDoesNotMatter() throws {
        let tmp = TempDir("chunks")
        let src = tmp.sub("src")
        try buildTree(src, privileged: isRoot, sparseSize: 64 << 20)
        let (bytes, _) = try archive(src)
        let expected = try listingWithoutSockets(src)
        for chunk in [1, 511, 512, 4096, 1 << 20] {
            let dst = tmp.sub("dst\(chunk)")
            try extract(bytes, to: dst, chunk: chunk)
            let got = try listing(dst)
            #expect(diff(expected, got) == [], "chunk \(chunk)")
        }
    }
}
