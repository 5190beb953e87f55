import CSyscalls
import Glibc

/// Writes an entry's data into a new file: stored bytes go to the extents they belong to (one
/// extent for an ordinary file, the sparse map's for a sparse one), and blocks of zeros are
/// skipped rather than written, so holes stay holes. The size is set at the end with ftruncate.
struct FileOutput {
    let fd: Int32
    let extents: [(offset: UInt64, length: UInt64)]
    let realSize: UInt64
    private var index = 0
    private var within: UInt64 = 0

    init(fd: Int32, extents: [(offset: UInt64, length: UInt64)], realSize: UInt64) {
        self.fd = fd
        self.extents = extents
        self.realSize = realSize
    }

    mutating func write(_ p: UnsafeRawPointer, _ count: Int) throws {
        var p = p
        var n = count
        while n > 0 {
            while index < extents.count, within == extents[index].length {
                index += 1
                within = 0
            }
            // The extents' lengths add up to the stored size (checked when the map was read).
            guard index < extents.count else { throw ArchiveError("more data than the sparse map describes") }
            let k = Int(min(UInt64(n), extents[index].length - within))
            try writeSkippingZeros(p, k, at: extents[index].offset + within)
            within += UInt64(k)
            p += k
            n -= k
        }
    }

    /// pwrite of the non-zero runs only, judged per 4 KiB block of the file.
    private func writeSkippingZeros(_ p: UnsafeRawPointer, _ len: Int, at offset: UInt64) throws {
        var i = 0
        var run = -1
        while i < len {
            let fileOff = offset + UInt64(i)
            let end = min(len, i + Int(4096 - fileOff % 4096))
            if uvm_ar_all_zero(p + i, end - i) != 0 {
                if run >= 0 {
                    try pwriteAll(fd, p + run, i - run, Int64(offset) + Int64(run))
                    run = -1
                }
            } else if run < 0 {
                run = i
            }
            i = end
        }
        if run >= 0 { try pwriteAll(fd, p + run, len - run, Int64(offset) + Int64(run)) }
    }

    func finish() throws {
        try check("truncate") { ftruncate(fd, off_t(realSize)) }
    }
}
