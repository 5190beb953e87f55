import CSyscalls
import Glibc
import Testing

@testable import Archive

/// TarWriter then TarExtractor: the extracted tree equals the original in everything tar keeps.
@Suite(.serialized) struct RoundTripTests {
    func roundTrip(privileged: Bool) throws {
        let tmp = TempDir("rt")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        try buildTree(src, privileged: privileged)
        let (bytes, wstats) = try archive(src)
        #expect(wstats.skippedSockets == 1)
        #expect(wstats.hardLinks == 1)
        #expect(wstats.sparseFiles >= 2)
        #expect(bytes.count < 4 << 20, "the sparse gigabyte is stored as its data only")
        let xstats = try extract(bytes, to: dst)
        #expect(xstats.hardLinks == 1)
        #expect(xstats.ignoredXattrs == 0)

        let a = try listingWithoutSockets(src), b = try listing(dst)
        if getenv("ARCHIVE_TEST_VERBOSE") != nil { print(b.joined(separator: "\n")) }
        #expect(a.count > 25)
        #expect(diff(a, b) == [])

        var st = stat()
        #expect(lstat(dst + "/sparse.img", &st) == 0)
        #expect(st.st_size == 1 << 30)
        #expect(st.st_blocks * 512 < 1 << 20, "holes stay holes: \(st.st_blocks) blocks")
        #expect(lstat(dst + "/zeros.bin", &st) == 0)
        #expect(st.st_blocks * 512 < 64 << 10, "a run of written zeros becomes a hole")
        // Again over the result: existing files are replaced, directories kept, nothing changes.
        try extract(bytes, to: dst, chunk: 8192)
        let again = try listing(dst)
        #expect(diff(a, again) == [])
        if privileged {
            #expect(lstat(dst + "/bin/su", &st) == 0)
            #expect(st.st_mode & 0o7777 == 0o4755 && st.st_uid == 1234 && st.st_gid == 5678)
            #expect(try readXattrs(fd: nil, path: Array((dst + "/bin/ping").utf8)).contains { $0.name == Array("security.capability".utf8) && $0.value == capNetRaw })
        }
    }

    @Test(.enabled(if: isRoot, "needs root: mknod, chown to other uids, security.capability"))
    func everyKindOfEntry() throws { try roundTrip(privileged: true) }

    @Test func unprivilegedEntries() throws { try roundTrip(privileged: false) }

    @Test func excludedPathsAndMountPointsAreLeftOut() throws {
        let tmp = TempDir("ex")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        _ = tmp.sub("src/proc")
        _ = tmp.sub("src/keep")
        try ok(mkdir(src + "/proc/self", 0o755), "mkdir")
        let (bytes, stats) = try archive(src, excluding: ["/proc/", "keep/missing"])
        #expect(stats.excluded == 1)
        try extract(bytes, to: dst)
        var st = stat()
        #expect(lstat(dst + "/proc", &st) != 0)
        #expect(lstat(dst + "/keep", &st) == 0)
    }

    @Test(.enabled(if: isRoot, "needs root: mount"))
    func otherFileSystemsAreNotEntered() throws {
        let tmp = TempDir("mnt")
        let src = tmp.sub("src"), dst = tmp.sub("dst")
        _ = tmp.sub("src/mnt")
        try run(["mount", "-t", "tmpfs", "-o", "size=1m", "uvm-archive-test", src + "/mnt"])
        defer { _ = try? run(["umount", src + "/mnt"]) }
        try ok(mkdir(src + "/mnt/inside", 0o755), "mkdir")
        let (bytes, _) = try archive(src)
        try extract(bytes, to: dst)
        var st = stat()
        #expect(lstat(dst + "/mnt", &st) == 0, "the mount point itself is kept")
        #expect(lstat(dst + "/mnt/inside", &st) != 0, "its contents are not")
    }

    @Test func paxTimesRoundTrip() {
        for (sec, nsec, text) in [(Int64(0), Int64(0), "0"), (1_700_000_000, 5, "1700000000.000000005"), (-2, 500_000_000, "-1.5"), (-1, 0, "-1")] {
            #expect(Tar.formatTime(sec: sec, nsec: nsec) == text)
            #expect(Tar.paxTime(Array(text.utf8)).map { [$0.sec, $0.nsec] } == [sec, nsec])
        }
        #expect(Tar.paxTime(Array("1.".utf8)).map { [$0.sec, $0.nsec] } == [1, 0])
        #expect(Tar.paxTime(Array("x".utf8)) == nil)
    }

    @Test func rootFileSystemIsRecognized() throws {
        let tmp = TempDir("rootfs")
        let r = tmp.path
        for d in ["usr", "usr/bin", "usr/lib", "etc"] { try ok(mkdir(r + "/" + d, 0o755), "mkdir") }
        #expect(throws: ArchiveError.self) { try inspectRootFS(at: r) }
        try ok(symlink("usr/bin", r + "/bin"), "symlink")                // merged /usr
        try ok(symlink("/bin/busybox", r + "/usr/bin/sh"), "symlink")    // dangling is fine
        #expect(throws: ArchiveError.self) { try inspectRootFS(at: r) }  // no os-release yet
        let text = "# comment\nNAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID='12'\n"
        let fd = open(r + "/usr/lib/os-release", O_WRONLY | O_CREAT, 0o644)
        _ = write(fd, text, text.utf8.count)
        close(fd)
        try ok(symlink("../usr/lib/os-release", r + "/etc/os-release"), "symlink")
        #expect(try inspectRootFS(at: r) == OSRelease(prettyName: "Debian GNU/Linux 12 (bookworm)", id: "debian", versionID: "12"))
        // A symlink that points out of the root is resolved inside it, not on the host.
        try ok(unlink(r + "/etc/os-release"), "unlink")
        try ok(unlink(r + "/usr/lib/os-release"), "unlink")
        try ok(symlink("/etc/hostname", r + "/etc/os-release"), "symlink")
        #expect(throws: ArchiveError.self) { try inspectRootFS(at: r) }
    }
}

/// Opt-in: ARCHIVE_SMOKE_DIR=/some/real/tree round-trips an existing tree (read only), e.g. a
/// debootstrap'ed root, to catch what hand-made trees miss.
@Suite struct RealTreeTests {
    static let dir = getenv("ARCHIVE_SMOKE_DIR").map { String(cString: $0) }

    @Test(.enabled(if: dir != nil, "set ARCHIVE_SMOKE_DIR to a tree to round-trip"))
    func realTreeRoundTrips() throws {
        let src = Self.dir!
        let tmp = TempDir("smoke")
        let dst = tmp.sub("dst")
        let x = try TarExtractor(destination: dst)
        let w = TarWriter { try x.feed($0) }  // streamed straight through, as import/export will be
        try w.addTree(src)
        try w.finish()
        let stats = try x.finish()
        print("smoke: \(w.stats) \(stats)")
        let a = try listingWithoutSockets(src), b = try listing(dst)
        #expect(diff(a, b) == [])
    }
}
