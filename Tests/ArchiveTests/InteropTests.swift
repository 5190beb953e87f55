import Foundation
import Glibc
import Testing

@testable import Archive

let haveGNUTar = (try? run(["tar", "--version"]))?.contains("GNU tar") ?? false

/// Our archives against GNU tar's, both ways. As root the tree has everything (owners, devices,
/// capabilities); otherwise the unprivileged part.
@Suite(.serialized, .enabled(if: haveGNUTar, "needs GNU tar")) struct InteropTests {
    @Test func gnuTarExtractsOurArchive() throws {
        let tmp = TempDir("gnu-x")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        try buildTree(src, privileged: isRoot)
        let (bytes, _) = try archive(src)
        let file = tmp.path + "/a.tar"
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        try run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", file, "-C", dst])
        let a = try listingWithoutSockets(src), b = try listing(dst)
        #expect(diff(a, b) == [])
    }

    /// GNU tar writes sparse files in three pax forms and one old GNU form; long names as
    /// pax records or as L/K entries; big ids as pax or base-256.
    @Test(arguments: [
        ["--format=pax", "--sparse"],
        ["--format=pax", "--sparse", "--sparse-version=0.0"],
        ["--format=pax", "--sparse", "--sparse-version=0.1"],
        ["--format=pax", "--sparse", "--sparse-version=1.0"],
        ["--format=gnu", "--sparse"],
    ])
    func weExtractGNUTarArchive(flags: [String]) throws {
        let tmp = TempDir("gnu-c")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        try buildTree(src, privileged: isRoot)
        let file = tmp.path + "/a.tar"
        let xattrs = flags.contains("--format=pax") ? ["--xattrs", "--xattrs-include=*"] : []
        try run(["tar", "--numeric-owner"] + xattrs + flags + ["-cf", file, "-C", src, "."])
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        try extract(bytes, to: dst, chunk: 65536 + 7)
        var a = try listingWithoutSockets(src), b = try listing(dst)
        if flags.contains("--format=gnu") {
            // The GNU format keeps neither xattrs nor sub-second times.
            func plain(_ l: [String]) -> [String] {
                l.map { line in
                    line.split(separator: " ").filter { !$0.hasPrefix("xattr:") }
                        .map { $0.hasPrefix("mtime=") ? String($0.prefix { $0 != "." }) : String($0) }.joined(separator: " ")
                }
            }
            a = plain(a)
            b = plain(b)
        }
        #expect(diff(a, b) == [])
        var st = stat()
        #expect(lstat(dst + "/sparse.img", &st) == 0 && st.st_blocks * 512 < 1 << 20, "holes stay holes")
    }
}

let haveBSDTar = (try? run(["bsdtar", "--version"]))?.contains("libarchive") ?? false

/// libarchive's bsdtar (what many rootfs builders use), both ways.
@Suite(.serialized, .enabled(if: haveBSDTar, "needs bsdtar (libarchive-tools)")) struct BSDTarInteropTests {
    @Test func bsdtarExtractsOurArchive() throws {
        let tmp = TempDir("bsd-x")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        try buildTree(src, privileged: isRoot, sparseSize: 64 << 20)
        let (bytes, _) = try archive(src)
        let file = tmp.path + "/a.tar"
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        try run(["bsdtar", "--xattrs", "--numeric-owner", "-xpf", file, "-C", dst])
        // bsdtar leaves the destination's own metadata alone: compare everything beneath it.
        // It also drops ACLs stored as system.posix_acl_* xattrs (it wants SCHILY.acl text).
        func noACL(_ l: [String]) -> [String] {
            l.dropFirst().map { $0.split(separator: " ").filter { !$0.hasPrefix("xattr:system.posix_acl") }.joined(separator: " ") }
        }
        let a = noACL(try listingWithoutSockets(src)), b = noACL(try listing(dst))
        #expect(diff(a, b) == [])
    }

    @Test func weExtractBSDTarArchive() throws {
        let tmp = TempDir("bsd-c")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        try buildTree(src, privileged: isRoot, sparseSize: 64 << 20)
        let file = tmp.path + "/a.tar"
        // ACLs come as SCHILY.acl.* text, with numeric ids: the extractor makes them xattrs again.
        try run(["bsdtar", "--format=pax", "--xattrs", "--acls", "--numeric-owner", "-cf", file, "-C", src, "."])
        try extract([UInt8](Data(contentsOf: URL(fileURLWithPath: file))), to: dst, chunk: 4096 + 3)
        let a = try listingWithoutSockets(src), b = try listing(dst)
        #expect(diff(a, b) == [])
    }
}
