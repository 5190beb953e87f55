import Glibc
import NIOCore

/// uvm's zero-copy 9P request (kernel-patches/0005-9p-uvmshm-zero-copy.patch): a Tread, Treaddir
/// or Twrite whose payload stays in the guest's own pages, named by guest-physical address. uvmd
/// reads and writes those pages in place through `GuestMemory`, and answers with the op's reply
/// carrying the count alone. On the wire (after size[4] type[1]=130 tag[2]):
///
///     op[1] fid[4] offset[8] count[4] first[4] npages[4] gpa[8]*npages
///
/// The payload starts `first` bytes into the first page and runs through the pages in order.
/// Everything here comes from an untrusted guest; the frame is our own copy (the pump copied it
/// out of the ring), so each field is read once and the guest cannot change it under us. Anything
/// that does not add up is answered with Rlerror, and the session goes on.
public struct P9ZeroCopyRequest: Sendable, Equatable {
    public static let typeCode: UInt8 = 130

    public var op: UInt8
    public var fid: UInt32
    public var offset: UInt64
    public var count: UInt32
    public var first: UInt32
    /// npages as the guest declared it (checked against `pages`).
    public var declaredPages: UInt32
    public var pages: [UInt64]
    /// Bytes after the last whole page address: a frame that does not add up.
    public var trailing: Int

    public init(op: UInt8, fid: UInt32, offset: UInt64, count: UInt32, first: UInt32, pages: [UInt64],
                declaredPages: UInt32? = nil, trailing: Int = 0) {
        self.op = op
        self.fid = fid
        self.offset = offset
        self.count = count
        self.first = first
        self.pages = pages
        self.declaredPages = declaredPages ?? UInt32(truncatingIfNeeded: pages.count)
        self.trailing = trailing
    }

    static let fixedBody = 1 + 4 + 8 + 4 + 4 + 4

    /// Reads what is there; the page list is as long as the frame (bounded by msize), whatever
    /// npages says, so a huge npages costs nothing and is refused by `validate`.
    static func decodeBody(_ r: inout P9Reader) throws -> P9ZeroCopyRequest {
        let op = try r.u8(), fid = try r.u32(), offset = try r.u64(), count = try r.u32()
        let first = try r.u32(), npages = try r.u32()
        var pages: [UInt64] = []
        pages.reserveCapacity(r.buffer.readableBytes / 8)
        while r.buffer.readableBytes >= 8 { pages.append(try r.u64()) }
        let trailing = r.buffer.readableBytes
        r.buffer.moveReaderIndex(forwardBy: trailing)
        return P9ZeroCopyRequest(op: op, fid: fid, offset: offset, count: count, first: first, pages: pages,
                                 declaredPages: npages, trailing: trailing)
    }

    func encodeBody(into out: inout ByteBuffer) {
        out.p9Write(op)
        out.p9Write(fid)
        out.p9Write(offset)
        out.p9Write(count)
        out.p9Write(first)
        out.p9Write(declaredPages)
        for p in pages { out.p9Write(p) }
        if trailing > 0 { out.writeRepeatingByte(0, count: trailing) }
    }

    public enum Op {
        public static let read: UInt8 = 116
        public static let readdir: UInt8 = 40
        public static let write: UInt8 = 118
    }

    /// The host memory the payload occupies, as iovecs inside `memory`'s mapping (adjacent pages
    /// merged), or the errno to answer: EINVAL for a list that does not add up (count 0 or above
    /// what msize allows, first not inside a page, more pages than msize can need, npages not
    /// what count needs, an unaligned address), EFAULT for a page not wholly in guest RAM.
    public func validate(memory: GuestMemory, msize: UInt32) throws(P9Errno) -> [iovec] {
        let page = GuestMemory.pageSize
        guard op == Op.read || op == Op.readdir || op == Op.write else { throw P9Errno(EINVAL) }
        guard count > 0, Int(count) <= Int(msize) - P9.ioHeaderSize else { throw P9Errno(EINVAL) }
        guard UInt64(first) < page, trailing == 0 else { throw P9Errno(EINVAL) }
        let maxPages = Int(msize) / Int(page) + 2
        guard pages.count <= maxPages, UInt64(declaredPages) == UInt64(pages.count) else { throw P9Errno(EINVAL) }
        let needed = (UInt64(first) + UInt64(count) + page - 1) / page
        guard needed == UInt64(pages.count) else { throw P9Errno(EINVAL) }
        var iov: [iovec] = []
        iov.reserveCapacity(pages.count)
        var left = UInt64(count)
        for (i, gpa) in pages.enumerated() {
            guard gpa % page == 0 else { throw P9Errno(EINVAL) }
            guard let p = memory.translate(gpa: gpa, length: page) else { throw P9Errno(EFAULT) }
            let skip = i == 0 ? UInt64(first) : 0
            let len = min(page - skip, left)
            let start = p + Int(skip)
            left -= len
            if let last = iov.last, last.iov_base! + last.iov_len == start {
                iov[iov.count - 1].iov_len += Int(len)
            } else {
                iov.append(iovec(iov_base: start, iov_len: Int(len)))
            }
        }
        return iov
    }
}

extension Plan9Session {
    /// Tzc: the op on the guest's pages. Regular files go straight between the file and the pages
    /// (preadv/pwritev); anything else (directories, xattr fids) through the ordinary op and one
    /// copy into or out of the pages.
    func zeroCopy(_ z: P9ZeroCopyRequest) throws(P9Errno) -> P9Message {
        guard let memory else { throw P9Errno(EOPNOTSUPP) }
        let iov = try z.validate(memory: memory, msize: msize)
        switch z.op {
        case P9ZeroCopyRequest.Op.read:
            let (_, state) = try lookup(z.fid).snapshot
            if case .file(let fd, _) = state {
                guard z.offset <= UInt64(Int64.max) else { throw P9Errno(EINVAL) }
                let n = try Self.transfer(iov, at: z.offset) { preadv(fd.raw, $0, $1, $2) }
                return .rzc(type: 117, count: UInt32(n))
            }
            let data = try read(fid: z.fid, offset: z.offset, count: z.count)
            return .rzc(type: 117, count: UInt32(Self.scatter(data, into: iov)))
        case P9ZeroCopyRequest.Op.readdir:
            let data = try readdir(fid: z.fid, offset: z.offset, count: z.count)
            return .rzc(type: 41, count: UInt32(Self.scatter(data, into: iov)))
        default:
            try checkWritable()
            let f = try lookup(z.fid)
            let (node, state) = f.snapshot
            if case .file(let fd, let writable) = state {
                guard writable else { throw P9Errno(EBADF) }
                guard z.offset <= UInt64(Int64.max) else { throw P9Errno(EINVAL) }
                if export.metadata { try killPriv(node, writer: f.uid) }
                let n = try Self.transfer(iov, at: z.offset) { pwritev(fd.raw, $0, $1, $2) }
                writeBehind?.wrote(fd, at: z.offset, count: n)
                return .rwrite(count: UInt32(n))
            }
            var data = ByteBufferAllocator().buffer(capacity: Int(z.count))
            for v in iov { data.writeBytes(UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len)) }
            return .rwrite(count: try write(fid: z.fid, offset: z.offset, data: data))
        }
    }

    /// preadv/pwritev until all of `iov` is done, end of file, or an error (which is reported only
    /// when nothing was done, as read(2) and write(2) do).
    static func transfer(_ iov: [iovec], at offset: UInt64,
                         _ op: (UnsafePointer<iovec>, Int32, off_t) -> Int) throws(P9Errno) -> Int {
        var iov = iov
        var done = 0
        var index = 0
        while index < iov.count {
            let batch = Int32(min(iov.count - index, 1024))  // IOV_MAX
            let r = iov.withUnsafeBufferPointer { op($0.baseAddress! + index, batch, off_t(offset) + off_t(done)) }
            if r < 0 {
                if errno == EINTR { continue }
                if done == 0 { throw P9Errno(errno) }
                break
            }
            if r == 0 { break }
            done += r
            var left = r
            while left > 0, index < iov.count {
                if left >= iov[index].iov_len {
                    left -= iov[index].iov_len
                    index += 1
                } else {
                    iov[index].iov_base! += left
                    iov[index].iov_len -= left
                    left = 0
                }
            }
        }
        return done
    }

    /// Copies `data` into the pages; returns how much fitted (all of it: the op was bounded by count).
    static func scatter(_ data: ByteBuffer, into iov: [iovec]) -> Int {
        data.withUnsafeReadableBytes { src in
            var done = 0
            for v in iov where done < src.count {
                let n = min(v.iov_len, src.count - done)
                v.iov_base!.copyMemory(from: src.baseAddress! + done, byteCount: n)
                done += n
            }
            return done
        }
    }
}
