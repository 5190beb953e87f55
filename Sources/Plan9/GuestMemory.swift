import Glibc

/// The guest's RAM, mapped into uvmd, for zero-copy 9P (P9ZeroCopy.swift): QEMU backs guest RAM
/// with a shared memfd, which uvmd maps whole, and a guest-physical address the guest names is
/// turned into a pointer into that mapping only after checking it lies wholly inside guest RAM.
/// Nothing the guest sends can name any other host memory: every pointer handed out is inside
/// `base..<base+size`, and the memfd is sealed against shrinking (a shrunk file would fault).
public final class GuestMemory: @unchecked Sendable {
    // Immutable after init; the mapping lives as long as this object (sessions hold it).
    public let base: UnsafeMutableRawPointer
    public let size: UInt64
    /// Guest RAM below 4 GiB is [0, lowSize) at memfd offset 0; the rest is at 4 GiB, at memfd
    /// offset lowSize (QEMU's q35 "ram-below-4g" and "ram-above-4g" aliases).
    public let lowSize: UInt64
    private let owned: Bool

    public static let pageSize: UInt64 = 4096
    static let fourGiB: UInt64 = 1 << 32

    /// QEMU 7.2's q35 split (hw/i386/pc_q35.c, pc_q35_init): RAM of 0xb0000000 bytes or more is
    /// split at 2 GiB, less stays wholly below 4 GiB (up to 0xb0000000), with no max-ram-below-4g
    /// option given (libvirt gives none).
    public static func q35LowSize(ramSize: UInt64) -> UInt64 {
        let lowmem: UInt64 = ramSize >= 0xb000_0000 ? 0x8000_0000 : 0xb000_0000
        return min(ramSize, lowmem)
    }

    /// Maps `fd` (the guest-RAM memfd, `ramSize` bytes) shared; the caller keeps its fd.
    public init(fd: Int32, ramSize: UInt64) throws(P9Errno) {
        guard ramSize > 0, ramSize % Self.pageSize == 0 else { throw P9Errno(EINVAL) }
        guard let p = mmap(nil, Int(ramSize), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw P9Errno(errno)
        }
        base = p
        size = ramSize
        lowSize = Self.q35LowSize(ramSize: ramSize)
        owned = true
    }

    /// Memory the caller owns and keeps alive (tests, fuzzing: a fake guest).
    public init(unownedBase: UnsafeMutableRawPointer, size: UInt64, lowSize: UInt64) {
        base = unownedBase
        self.size = size
        self.lowSize = min(lowSize, size)
        owned = false
    }

    deinit {
        if owned { munmap(base, Int(size)) }
    }

    /// The memfd offset of guest-physical [gpa, gpa+length), or nil unless the whole range is RAM
    /// (not the PCI hole, not past the end, not wrapping around).
    public func offset(gpa: UInt64, length: UInt64) -> UInt64? {
        guard length > 0 else { return nil }
        let (end, overflow) = gpa.addingReportingOverflow(length)
        guard !overflow else { return nil }
        if end <= lowSize { return gpa }
        let highSize = size - lowSize
        guard gpa >= Self.fourGiB, highSize > 0, end - Self.fourGiB <= highSize else { return nil }
        return lowSize + (gpa - Self.fourGiB)
    }

    /// A pointer to guest-physical [gpa, gpa+length) inside the mapping, or nil (see `offset`).
    public func translate(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        guard let off = offset(gpa: gpa, length: length) else { return nil }
        return base + Int(off)
    }
}
