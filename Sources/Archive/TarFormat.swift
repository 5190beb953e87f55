/// The tar header layout (POSIX ustar, with the GNU fields the reader understands) and the
/// encodings shared by the writer and the extractor: numeric fields, checksums, pax records.
enum Tar {
    static let block = 512

    // ustar field offsets and widths.
    static let name = (0, 100), mode = (100, 8), uid = (108, 8), gid = (116, 8), size = (124, 12)
    static let mtime = (136, 12), chksum = (148, 8), typeflag = 156, linkname = (157, 100)
    static let magic = (257, 6), version = (263, 2), uname = (265, 32), gname = (297, 32)
    static let devmajor = (329, 8), devminor = (337, 8), prefix = (345, 155)
    // Old GNU sparse ('S'): 4 (offset, numbytes) pairs, then isextended and the real size.
    static let gnuSparse = 386, gnuIsExtended = 482, gnuRealSize = (483, 12)

    enum TypeFlag {
        static let regular: UInt8 = 0x30, regularOld: UInt8 = 0, hardLink: UInt8 = 0x31, symlink: UInt8 = 0x32
        static let char: UInt8 = 0x33, block: UInt8 = 0x34, directory: UInt8 = 0x35, fifo: UInt8 = 0x36
        static let contiguous: UInt8 = 0x37, paxLocal: UInt8 = 0x78 /* x */, paxGlobal: UInt8 = 0x67 /* g */
        static let solarisPax: UInt8 = 0x58 /* X */, gnuLongName: UInt8 = 0x4C /* L */, gnuLongLink: UInt8 = 0x4B /* K */
        static let gnuSparse: UInt8 = 0x53 /* S */, gnuDumpDir: UInt8 = 0x44 /* D */, gnuVolume: UInt8 = 0x56 /* V */
        static let gnuMultiVolume: UInt8 = 0x4D /* M */
    }

    static func padding(_ size: UInt64) -> Int { Int((UInt64(block) - size % UInt64(block)) % UInt64(block)) }

    // MARK: numeric fields

    /// Octal, NUL-terminated, when it fits in `width - 1` digits; else GNU base-256 (high bit of
    /// the first byte set, big-endian), which GNU tar and bsdtar read.
    static func putNumber(_ h: inout [UInt8], _ field: (Int, Int), _ value: UInt64) {
        let (off, width) = field
        let digits = width - 1
        if digits * 3 >= 64 || value < (UInt64(1) << UInt64(digits * 3)) {
            var v = value
            for i in stride(from: digits - 1, through: 0, by: -1) {
                h[off + i] = 0x30 + UInt8(v & 7)
                v >>= 3
            }
            h[off + digits] = 0
        } else {
            var v = value
            for i in stride(from: width - 1, through: 1, by: -1) {
                h[off + i] = UInt8(v & 0xff)
                v >>= 8
            }
            h[off] = 0x80
        }
    }

    /// Reads an octal (leading spaces/NULs allowed, ending at space or NUL) or base-256 field.
    /// nil when it does not parse; an empty field is 0.
    static func number(_ h: UnsafeRawBufferPointer, _ field: (Int, Int)) -> UInt64? {
        let (off, width) = field
        if h[off] & 0x80 != 0 {
            if h[off] == 0xff { return nil }  // negative
            var v = UInt64(h[off] & 0x7f)
            for i in 1..<width {
                if v > UInt64.max >> 8 { return nil }
                v = v << 8 | UInt64(h[off + i])
            }
            return v
        }
        var i = off
        let end = off + width
        while i < end, h[i] == 0x20 || h[i] == 0 { i += 1 }
        if i == end { return 0 }
        var v: UInt64 = 0
        while i < end, h[i] >= 0x30, h[i] <= 0x37 {
            if v > UInt64.max >> 3 { return nil }
            v = v << 3 | UInt64(h[i] - 0x30)
            i += 1
        }
        while i < end {  // only terminators may follow
            if h[i] != 0x20 && h[i] != 0 { return nil }
            i += 1
        }
        return v
    }

    /// A field that may be negative (mtime before 1970): GNU tar writes those in base-256 with a
    /// 0xff lead (two's complement). nil when it does not parse or does not fit in Int64.
    static func signedNumber(_ h: UnsafeRawBufferPointer, _ field: (Int, Int)) -> Int64? {
        let (off, width) = field
        guard h[off] == 0xff else { return number(h, field).flatMap { $0 <= UInt64(Int64.max) ? Int64($0) : nil } }
        var v: Int64 = -1
        for i in 0..<width {
            if i < width - 8 { guard h[off + i] == 0xff else { return nil } }
            v = (v << 8) | Int64(h[off + i])
        }
        return v < 0 ? v : nil
    }

    /// A NUL-terminated (or full-width) string field.
    static func string(_ h: UnsafeRawBufferPointer, _ field: (Int, Int)) -> [UInt8] {
        let (off, width) = field
        var out = [UInt8]()
        for i in off..<off + width {
            if h[i] == 0 { break }
            out.append(h[i])
        }
        return out
    }

    static func putString(_ h: inout [UInt8], _ field: (Int, Int), _ s: some Collection<UInt8>) {
        for (i, b) in s.prefix(field.1).enumerated() { h[field.0 + i] = b }
    }

    // MARK: checksum

    /// Sum of the header bytes with the checksum field counted as spaces: unsigned (POSIX) and
    /// signed (some historic tars).
    static func checksums(_ h: UnsafeRawBufferPointer) -> (unsigned: UInt64, signed: Int64) {
        var u: UInt64 = 0
        var s: Int64 = 0
        for i in 0..<block {
            let b = (i >= chksum.0 && i < chksum.0 + chksum.1) ? 0x20 : h[i]
            u += UInt64(b)
            s += Int64(Int8(bitPattern: b))
        }
        return (u, s)
    }

    static func sealChecksum(_ h: inout [UInt8]) {
        let sum = h.withUnsafeBytes { checksums($0).unsigned }
        putNumber(&h, (chksum.0, 7), sum)  // six digits, NUL, then a space: the traditional form
        h[chksum.0 + 7] = 0x20
    }

    // MARK: pax records

    /// "LEN key=value\n", LEN counting itself; value is bytes (binary is fine: it is length-prefixed).
    static func paxRecord(_ key: some Collection<UInt8>, _ value: some Collection<UInt8>) -> [UInt8] {
        let rest = key.count + value.count + 3  // ' ', '=', '\n'
        var len = rest + 1
        while String(len).utf8.count + rest != len { len = String(len).utf8.count + rest }
        var r = Array(String(len).utf8)
        r.append(0x20)
        r.append(contentsOf: key)
        r.append(0x3D)
        r.append(contentsOf: value)
        r.append(0x0A)
        return r
    }

    static func paxRecord(_ key: String, _ value: String) -> [UInt8] { paxRecord(Array(key.utf8), Array(value.utf8)) }

    /// Splits pax data into (key, value) records; nil + reason when a record is malformed.
    static func paxRecords(_ data: [UInt8]) -> Result<[(key: [UInt8], value: [UInt8])], ArchiveError> {
        var out: [(key: [UInt8], value: [UInt8])] = []
        var i = 0
        while i < data.count {
            // GNU tar pads pax data with NULs in some versions: tolerate trailing NULs.
            if data[i...].allSatisfy({ $0 == 0 }) { break }
            let start = i
            var len = 0
            while i < data.count, data[i] >= 0x30, data[i] <= 0x39 {
                len = len * 10 + Int(data[i] - 0x30)
                if len > data.count { return .failure(ArchiveError("pax record at \(start) claims \(len) bytes, more than the header holds")) }
                i += 1
            }
            guard i > start, i < data.count, data[i] == 0x20 else {
                return .failure(ArchiveError("pax record at \(start) does not start with a length"))
            }
            let end = start + len
            guard end <= data.count, end > i + 1, data[end - 1] == 0x0A else {
                return .failure(ArchiveError("pax record at \(start) has a wrong length (\(len))"))
            }
            let body = data[(i + 1)..<(end - 1)]
            guard let eq = body.firstIndex(of: 0x3D) else {
                return .failure(ArchiveError("pax record at \(start) has no '='"))
            }
            out.append((Array(body[body.startIndex..<eq]), Array(body[(eq + 1)...])))
            i = end
        }
        return .success(out)
    }

    /// A decimal unsigned integer (pax size, uid, ...), nil unless all digits and no overflow.
    static func decimal(_ v: some Collection<UInt8>) -> UInt64? {
        guard !v.isEmpty, v.count <= 20 else { return nil }
        var r: UInt64 = 0
        for b in v {
            guard b >= 0x30, b <= 0x39 else { return nil }
            let (m, o1) = r.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(UInt64(b - 0x30))
            if o1 || o2 { return nil }
            r = a
        }
        return r
    }

    /// A pax time "[-]SEC[.FRACTION]" as seconds and nanoseconds (nsec in 0..<1e9, floor semantics).
    static func paxTime(_ v: [UInt8]) -> (sec: Int64, nsec: Int64)? {
        var s = v[...]
        let negative = s.first == 0x2D
        if negative { s = s.dropFirst() }
        let dot = s.firstIndex(of: 0x2E)
        let intPart = dot.map { s[s.startIndex..<$0] } ?? s
        guard let whole = decimal(intPart), whole < UInt64(Int64.max / 2) else { return nil }
        var nsec: Int64 = 0
        if let dot {
            let frac = s[(dot + 1)...]
            var scale: Int64 = 100_000_000
            for b in frac {
                guard b >= 0x30, b <= 0x39 else { return nil }
                nsec += Int64(b - 0x30) * scale
                scale /= 10
            }
        }
        if !negative { return (Int64(whole), nsec) }
        return nsec == 0 ? (-Int64(whole), 0) : (-Int64(whole) - 1, 1_000_000_000 - nsec)
    }

    static func formatTime(sec: Int64, nsec: Int64) -> String {
        func frac(_ n: Int64) -> String {
            var f = String(n)
            f = String(repeating: "0", count: 9 - f.count) + f
            while f.hasSuffix("0") { f.removeLast() }
            return f.isEmpty ? "" : "." + f
        }
        if sec >= 0 { return String(sec) + frac(nsec) }
        // -1.25 is sec -2, nsec 750000000.
        return nsec == 0 ? String(sec) : "-" + String(-(sec + 1)) + frac(1_000_000_000 - nsec)
    }
}
