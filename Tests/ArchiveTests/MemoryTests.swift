import Glibc
import Testing

@testable import Archive

/// Resident memory of this process, in KiB.
func residentKiB() -> Int {
    let fd = open("/proc/self/status", O_RDONLY)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 8192)
    let n = read(fd, &buf, buf.count)
    let text = String(decoding: buf[..<max(n, 0)], as: UTF8.self)
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return -1 }
    return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? -1
}

@Suite struct MemoryTests {
    /// A 1 GiB entry fed in 1 MiB pieces: no piece is kept, and zero runs are not even written.
    @Test func aGigabyteEntryDoesNotGrowMemory() throws {
        let tmp = TempDir("mem")
        let dst = tmp.sub("dst")
        let size = 1 << 30, chunk = 1 << 20
        let zeros = [UInt8](repeating: 0, count: chunk)
        let pattern = (0..<chunk).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        let x = try TarExtractor(destination: dst)
        try x.feed(Forge.header("big", size: UInt64(size)))
        let before = residentKiB()
        for i in 0..<(size / chunk) {
            try x.feed(i % 128 == 5 ? pattern : zeros)  // 8 MiB of data in a gigabyte
        }
        try x.feed(Forge.end)
        try x.finish()
        let after = residentKiB()
        // Generous: other tests run in this process at the same time; keeping the gigabyte would show.
        #expect(before > 0 && after - before < 64 << 10, "RSS grew from \(before) to \(after) KiB")

        var st = stat()
        #expect(lstat(dst + "/big", &st) == 0)
        #expect(st.st_size == size)
        #expect(st.st_blocks * 512 < 16 << 20, "\(st.st_blocks) blocks: zero runs must be holes")
        let fd = open(dst + "/big", O_RDONLY)
        defer { close(fd) }
        var back = [UInt8](repeating: 0, count: chunk)
        #expect(pread(fd, &back, chunk, off_t(133 * chunk)) == chunk && back == pattern)
        #expect(pread(fd, &back, chunk, off_t(134 * chunk)) == chunk && back == zeros)
    }

    /// The writer hands out at most its buffer size at a time, whatever the file sizes.
    @Test func writerPiecesAreBounded() throws {
        let tmp = TempDir("wmem")
        let src = tmp.sub("src")
        let fd = open(src + "/f", O_WRONLY | O_CREAT, 0o644)
        let data = [UInt8](repeating: 7, count: 3 << 20)
        _ = write(fd, data, data.count)
        close(fd)
        var largest = 0, total = 0
        let w = TarWriter(bufferSize: 1 << 20) { largest = max(largest, $0.count); total += $0.count }
        try w.addTree(src)
        try w.finish()
        #expect(largest == 1 << 20)
        // Data, two headers (each maybe with a pax header for the nanoseconds), two end blocks.
        #expect(total % 512 == 0 && total >= 3 << 20 + 4 * 512 && total <= 3 << 20 + 8 * 512)
    }
}
