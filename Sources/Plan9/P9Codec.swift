import NIOCore

// 9P is little-endian throughout; strings are len[2] + bytes; data is count[4] + bytes.

extension ByteBuffer {
    @inlinable mutating func p9Write(_ v: UInt8) { writeInteger(v, endianness: .little) }
    @inlinable mutating func p9Write(_ v: UInt16) { writeInteger(v, endianness: .little) }
    @inlinable mutating func p9Write(_ v: UInt32) { writeInteger(v, endianness: .little) }
    @inlinable mutating func p9Write(_ v: UInt64) { writeInteger(v, endianness: .little) }

    mutating func p9Write(_ s: P9String) {
        // Callers bound strings (names, link targets) well below 64 KiB.
        p9Write(UInt16(truncatingIfNeeded: s.bytes.count))
        writeBytes(s.bytes)
    }

    /// Rgetattr's body (and Ruvmsetattr's, Ruvmlcreate's twice after its iounit).
    mutating func p9WriteAttr(_ a: P9Attr) {
        p9Write(a.valid)
        p9Write(a.qid)
        p9Write(a.mode)
        p9Write(a.uid)
        p9Write(a.gid)
        for v in [a.nlink, a.rdev, a.size, a.blksize, a.blocks, a.atimeSec, a.atimeNsec, a.mtimeSec,
                  a.mtimeNsec, a.ctimeSec, a.ctimeNsec, a.btimeSec, a.btimeNsec, a.gen, a.dataVersion] {
            p9Write(v)
        }
    }
    mutating func p9Write(_ q: Qid) {
        p9Write(q.type)
        p9Write(q.version)
        p9Write(q.path)
    }

    /// Appends one Rreaddir entry.
    public mutating func p9WriteDirEntry(_ e: P9DirEntry) {
        p9Write(e.qid)
        p9Write(e.offset)
        p9Write(e.type)
        p9Write(e.name)
    }
}

/// A bounds-checked reader over one message body: every read throws instead of trapping, because
/// the bytes come from an untrusted guest.
struct P9Reader {
    var buffer: ByteBuffer

    mutating func u8() throws -> UInt8 {
        guard let v = buffer.readInteger(endianness: .little, as: UInt8.self) else { throw P9DecodeError("truncated") }
        return v
    }
    mutating func u16() throws -> UInt16 {
        guard let v = buffer.readInteger(endianness: .little, as: UInt16.self) else { throw P9DecodeError("truncated") }
        return v
    }
    mutating func u32() throws -> UInt32 {
        guard let v = buffer.readInteger(endianness: .little, as: UInt32.self) else { throw P9DecodeError("truncated") }
        return v
    }
    mutating func u64() throws -> UInt64 {
        guard let v = buffer.readInteger(endianness: .little, as: UInt64.self) else { throw P9DecodeError("truncated") }
        return v
    }
    mutating func string() throws -> P9String {
        let n = Int(try u16())
        guard let bytes = buffer.readBytes(length: n) else { throw P9DecodeError("truncated string") }
        return P9String(bytes: bytes)
    }
    mutating func qid() throws -> Qid {
        let t = try u8()
        let v = try u32()
        let p = try u64()
        return Qid(type: t, version: v, path: p)
    }
    /// Rgetattr's body (and Ruvmsetattr's, Ruvmlcreate's twice after its iounit).
    mutating func attr() throws -> P9Attr {
        var a = P9Attr()
        a.valid = try u64()
        a.qid = try qid()
        a.mode = try u32()
        a.uid = try u32()
        a.gid = try u32()
        a.nlink = try u64()
        a.rdev = try u64()
        a.size = try u64()
        a.blksize = try u64()
        a.blocks = try u64()
        a.atimeSec = try u64()
        a.atimeNsec = try u64()
        a.mtimeSec = try u64()
        a.mtimeNsec = try u64()
        a.ctimeSec = try u64()
        a.ctimeNsec = try u64()
        a.btimeSec = try u64()
        a.btimeNsec = try u64()
        a.gen = try u64()
        a.dataVersion = try u64()
        return a
    }
    /// Tsetattr's body after the fid (and Tuvmsetattr's).
    mutating func setAttr() throws -> P9SetAttr {
        var a = P9SetAttr()
        a.valid = try u32()
        a.mode = try u32()
        a.uid = try u32()
        a.gid = try u32()
        a.size = try u64()
        a.atimeSec = try u64()
        a.atimeNsec = try u64()
        a.mtimeSec = try u64()
        a.mtimeNsec = try u64()
        return a
    }
    mutating func data() throws -> ByteBuffer {
        let n = Int(try u32())
        guard let slice = buffer.readSlice(length: n) else { throw P9DecodeError("truncated data") }
        return slice
    }
    /// A lone nonzero count[4] ending the message (P9ZeroCopy.swift's Rread/Rreaddir).
    var zeroCopyCount: UInt32? {
        guard buffer.readableBytes == 4, let n = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self),
              n > 0 else { return nil }
        return n
    }
    func end() throws {
        if buffer.readableBytes != 0 { throw P9DecodeError("\(buffer.readableBytes) trailing bytes") }
    }
}

extension P9Frame {
    /// Decodes one whole message (size field included) as cut out by the frame decoder.
    public static func decode(_ frame: ByteBuffer) throws -> P9Frame {
        var r = P9Reader(buffer: frame)
        let size = try r.u32()
        guard size == frame.readableBytes else { throw P9DecodeError("size field \(size) != frame \(frame.readableBytes)") }
        let type = try r.u8()
        let tag = try r.u16()
        let m: P9Message
        switch type {
        case 100: m = .tversion(msize: try r.u32(), version: try r.string())
        case 101: m = .rversion(msize: try r.u32(), version: try r.string())
        case 104:
            m = .tattach(fid: try r.u32(), afid: try r.u32(), uname: try r.string(), aname: try r.string(),
                         nUname: try r.u32())
        case 105: m = .rattach(qid: try r.qid())
        case 7: m = .rlerror(ecode: try r.u32())
        case 108: m = .tflush(oldtag: try r.u16())
        case 109: m = .rflush
        case 110:
            let fid = try r.u32()
            let newfid = try r.u32()
            let n = Int(try r.u16())
            guard n <= P9.maxWalkElements else { throw P9DecodeError("Twalk with \(n) names") }
            var names: [P9String] = []
            names.reserveCapacity(n)
            for _ in 0..<n { names.append(try r.string()) }
            m = .twalk(fid: fid, newfid: newfid, names: names)
        case 111:
            let n = Int(try r.u16())
            guard n <= P9.maxWalkElements else { throw P9DecodeError("Rwalk with \(n) qids") }
            var qids: [Qid] = []
            for _ in 0..<n { qids.append(try r.qid()) }
            m = .rwalk(qids: qids)
        case 12: m = .tlopen(fid: try r.u32(), flags: try r.u32())
        case 13: m = .rlopen(qid: try r.qid(), iounit: try r.u32())
        case 14:
            m = .tlcreate(fid: try r.u32(), name: try r.string(), flags: try r.u32(), mode: try r.u32(), gid: try r.u32())
        case 15: m = .rlcreate(qid: try r.qid(), iounit: try r.u32())
        case 116: m = .tread(fid: try r.u32(), offset: try r.u64(), count: try r.u32())
        // A count with no data after it: the answer to a Tzc, whose data is in the client's pages.
        case 117 where r.zeroCopyCount != nil, 41 where r.zeroCopyCount != nil:
            m = .rzc(type: type, count: try r.u32())
        case 117: m = .rread(data: try r.data())
        case 118: m = .twrite(fid: try r.u32(), offset: try r.u64(), data: try r.data())
        case 119: m = .rwrite(count: try r.u32())
        case 120: m = .tclunk(fid: try r.u32())
        case 121: m = .rclunk
        case 122: m = .tremove(fid: try r.u32())
        case 123: m = .rremove
        case 8: m = .tstatfs(fid: try r.u32())
        case 9:
            var s = P9StatFS()
            s.type = try r.u32()
            s.bsize = try r.u32()
            s.blocks = try r.u64()
            s.bfree = try r.u64()
            s.bavail = try r.u64()
            s.files = try r.u64()
            s.ffree = try r.u64()
            s.fsid = try r.u64()
            s.namelen = try r.u32()
            m = .rstatfs(s)
        case 24: m = .tgetattr(fid: try r.u32(), mask: try r.u64())
        case 25: m = .rgetattr(try r.attr())
        case 93: m = .ruvmsetattr(try r.attr())
        case 26: m = .tsetattr(fid: try r.u32(), attr: try r.setAttr())
        case 92: m = .tuvmsetattr(fid: try r.u32(), attr: try r.setAttr())
        case 94:
            m = .tuvmlcreate(dfid: try r.u32(), ofid: try r.u32(), pfid: try r.u32(), name: try r.string(),
                             flags: try r.u32(), mode: try r.u32(), gid: try r.u32())
        case 95: m = .ruvmlcreate(iounit: try r.u32(), attr: try r.attr(), dir: try r.attr())
        case 96:
            // The count is the guest's: each fid is read (and bounded by the message) before it is kept.
            let n = Int(try r.u16())
            var fids: [UInt32] = []
            for _ in 0..<n { fids.append(try r.u32()) }
            m = .tuvmclunk(fids: fids)
        case 97: m = .ruvmclunk
        case 27: m = .rsetattr
        case 40: m = .treaddir(fid: try r.u32(), offset: try r.u64(), count: try r.u32())
        case 41: m = .rreaddir(data: try r.data())
        case 50: m = .tfsync(fid: try r.u32(), datasync: try r.u32())
        case 51: m = .rfsync
        case 72: m = .tmkdir(dfid: try r.u32(), name: try r.string(), mode: try r.u32(), gid: try r.u32())
        case 73: m = .rmkdir(qid: try r.qid())
        case 18:
            m = .tmknod(dfid: try r.u32(), name: try r.string(), mode: try r.u32(), major: try r.u32(),
                        minor: try r.u32(), gid: try r.u32())
        case 19: m = .rmknod(qid: try r.qid())
        case 16: m = .tsymlink(dfid: try r.u32(), name: try r.string(), target: try r.string(), gid: try r.u32())
        case 17: m = .rsymlink(qid: try r.qid())
        case 22: m = .treadlink(fid: try r.u32())
        case 23: m = .rreadlink(target: try r.string())
        case 70: m = .tlink(dfid: try r.u32(), fid: try r.u32(), name: try r.string())
        case 71: m = .rlink
        case 20: m = .trename(fid: try r.u32(), dfid: try r.u32(), name: try r.string())
        case 21: m = .rrename
        case 74:
            m = .trenameat(olddirfid: try r.u32(), oldname: try r.string(), newdirfid: try r.u32(),
                           newname: try r.string())
        case 75: m = .rrenameat
        case 76: m = .tunlinkat(dirfid: try r.u32(), name: try r.string(), flags: try r.u32())
        case 77: m = .runlinkat
        case 52:
            let fid = try r.u32()
            let l = P9Lock(type: try r.u8(), flags: try r.u32(), start: try r.u64(), length: try r.u64(),
                           procID: try r.u32(), clientID: try r.string())
            m = .tlock(fid: fid, lock: l)
        case 53: m = .rlock(status: try r.u8())
        case 54:
            let fid = try r.u32()
            let l = P9Lock(type: try r.u8(), start: try r.u64(), length: try r.u64(), procID: try r.u32(),
                           clientID: try r.string())
            m = .tgetlock(fid: fid, lock: l)
        case 55:
            m = .rgetlock(lock: P9Lock(type: try r.u8(), start: try r.u64(), length: try r.u64(),
                                       procID: try r.u32(), clientID: try r.string()))
        case 30: m = .txattrwalk(fid: try r.u32(), newfid: try r.u32(), name: try r.string())
        case 31: m = .rxattrwalk(size: try r.u64())
        case 32: m = .txattrcreate(fid: try r.u32(), name: try r.string(), size: try r.u64(), flags: try r.u32())
        case 33: m = .rxattrcreate
        case 90: m = .tuvmnotify(flags: try r.u32())
        case 91:
            var notes: [P9Note] = []
            let count = try r.u16()
            for _ in 0..<count {
                guard let kind = P9Note.Kind(rawValue: try r.u8()) else { throw P9DecodeError("unknown note kind") }
                let path = try r.u64()
                notes.append(P9Note(kind, path: path, name: try r.string().bytes))
            }
            m = .ruvmnotify(notes: notes)
        case P9ZeroCopyRequest.typeCode: m = .tzc(try P9ZeroCopyRequest.decodeBody(&r))
        case 102, 112, 114, 124, 126:
            // Tauth, Topen, Tcreate, Tstat, Twstat: valid 9P, not 9P2000.L.
            return P9Frame(tag: tag, message: .unsupported(type: type))
        default:
            throw P9DecodeError("unknown message type \(type)")
        }
        try r.end()
        return P9Frame(tag: tag, message: m)
    }

    /// Appends the whole message, size field included.
    public func encode(into out: inout ByteBuffer) {
        let start = out.writerIndex
        out.p9Write(UInt32(0))  // size, patched below
        out.p9Write(message.typeCode)
        out.p9Write(tag)
        switch message {
        case .tversion(let msize, let version), .rversion(let msize, let version):
            out.p9Write(msize)
            out.p9Write(version)
        case .tattach(let fid, let afid, let uname, let aname, let nUname):
            out.p9Write(fid)
            out.p9Write(afid)
            out.p9Write(uname)
            out.p9Write(aname)
            out.p9Write(nUname)
        case .rattach(let qid), .rmkdir(let qid), .rmknod(let qid), .rsymlink(let qid):
            out.p9Write(qid)
        case .rlerror(let ecode):
            out.p9Write(ecode)
        case .tflush(let oldtag):
            out.p9Write(oldtag)
        case .rflush, .rclunk, .ruvmclunk, .rremove, .rsetattr, .rfsync, .rlink, .rrename, .rrenameat, .runlinkat,
             .rxattrcreate, .unsupported:
            break
        case .twalk(let fid, let newfid, let names):
            out.p9Write(fid)
            out.p9Write(newfid)
            out.p9Write(UInt16(truncatingIfNeeded: names.count))
            for n in names { out.p9Write(n) }
        case .rwalk(let qids):
            out.p9Write(UInt16(truncatingIfNeeded: qids.count))
            for q in qids { out.p9Write(q) }
        case .tlopen(let fid, let flags):
            out.p9Write(fid)
            out.p9Write(flags)
        case .rlopen(let qid, let iounit), .rlcreate(let qid, let iounit):
            out.p9Write(qid)
            out.p9Write(iounit)
        case .tlcreate(let fid, let name, let flags, let mode, let gid):
            out.p9Write(fid)
            out.p9Write(name)
            out.p9Write(flags)
            out.p9Write(mode)
            out.p9Write(gid)
        case .tread(let fid, let offset, let count), .treaddir(let fid, let offset, let count):
            out.p9Write(fid)
            out.p9Write(offset)
            out.p9Write(count)
        case .rread(var data), .rreaddir(var data):
            out.p9Write(UInt32(data.readableBytes))
            out.writeBuffer(&data)
        case .twrite(let fid, let offset, var data):
            out.p9Write(fid)
            out.p9Write(offset)
            out.p9Write(UInt32(data.readableBytes))
            out.writeBuffer(&data)
        case .rwrite(let count):
            out.p9Write(count)
        case .tclunk(let fid), .tremove(let fid), .tstatfs(let fid), .treadlink(let fid):
            out.p9Write(fid)
        case .tuvmnotify(let flags):
            out.p9Write(flags)
        case .ruvmnotify(let notes):
            out.p9Write(UInt16(truncatingIfNeeded: notes.count))
            for n in notes {
                out.p9Write(n.kind.rawValue)
                out.p9Write(n.path)
                out.p9Write(P9String(bytes: n.name))
            }
        case .rstatfs(let s):
            out.p9Write(s.type)
            out.p9Write(s.bsize)
            out.p9Write(s.blocks)
            out.p9Write(s.bfree)
            out.p9Write(s.bavail)
            out.p9Write(s.files)
            out.p9Write(s.ffree)
            out.p9Write(s.fsid)
            out.p9Write(s.namelen)
        case .tgetattr(let fid, let mask):
            out.p9Write(fid)
            out.p9Write(mask)
        case .tuvmclunk(let fids):
            out.p9Write(UInt16(truncatingIfNeeded: fids.count))
            for f in fids { out.p9Write(f) }
        case .tuvmlcreate(let dfid, let ofid, let pfid, let name, let flags, let mode, let gid):
            for v in [dfid, ofid, pfid] { out.p9Write(v) }
            out.p9Write(name)
            for v in [flags, mode, gid] { out.p9Write(v) }
        case .ruvmlcreate(let iounit, let a, let dir):
            out.p9Write(iounit)
            out.p9WriteAttr(a)
            out.p9WriteAttr(dir)
        case .rgetattr(let a), .ruvmsetattr(let a):
            out.p9WriteAttr(a)
        case .tsetattr(let fid, let a), .tuvmsetattr(let fid, let a):
            out.p9Write(fid)
            out.p9Write(a.valid)
            out.p9Write(a.mode)
            out.p9Write(a.uid)
            out.p9Write(a.gid)
            out.p9Write(a.size)
            out.p9Write(a.atimeSec)
            out.p9Write(a.atimeNsec)
            out.p9Write(a.mtimeSec)
            out.p9Write(a.mtimeNsec)
        case .tfsync(let fid, let datasync):
            out.p9Write(fid)
            out.p9Write(datasync)
        case .tmkdir(let dfid, let name, let mode, let gid):
            out.p9Write(dfid)
            out.p9Write(name)
            out.p9Write(mode)
            out.p9Write(gid)
        case .tmknod(let dfid, let name, let mode, let major, let minor, let gid):
            out.p9Write(dfid)
            out.p9Write(name)
            out.p9Write(mode)
            out.p9Write(major)
            out.p9Write(minor)
            out.p9Write(gid)
        case .tsymlink(let dfid, let name, let target, let gid):
            out.p9Write(dfid)
            out.p9Write(name)
            out.p9Write(target)
            out.p9Write(gid)
        case .rreadlink(let target):
            out.p9Write(target)
        case .tlink(let dfid, let fid, let name):
            out.p9Write(dfid)
            out.p9Write(fid)
            out.p9Write(name)
        case .trename(let fid, let dfid, let name):
            out.p9Write(fid)
            out.p9Write(dfid)
            out.p9Write(name)
        case .trenameat(let olddirfid, let oldname, let newdirfid, let newname):
            out.p9Write(olddirfid)
            out.p9Write(oldname)
            out.p9Write(newdirfid)
            out.p9Write(newname)
        case .tunlinkat(let dirfid, let name, let flags):
            out.p9Write(dirfid)
            out.p9Write(name)
            out.p9Write(flags)
        case .tlock(let fid, let l):
            out.p9Write(fid)
            out.p9Write(l.type)
            out.p9Write(l.flags)
            out.p9Write(l.start)
            out.p9Write(l.length)
            out.p9Write(l.procID)
            out.p9Write(l.clientID)
        case .rlock(let status):
            out.p9Write(status)
        case .tgetlock(let fid, let l):
            out.p9Write(fid)
            out.p9Write(l.type)
            out.p9Write(l.start)
            out.p9Write(l.length)
            out.p9Write(l.procID)
            out.p9Write(l.clientID)
        case .rgetlock(let l):
            out.p9Write(l.type)
            out.p9Write(l.start)
            out.p9Write(l.length)
            out.p9Write(l.procID)
            out.p9Write(l.clientID)
        case .txattrwalk(let fid, let newfid, let name):
            out.p9Write(fid)
            out.p9Write(newfid)
            out.p9Write(name)
        case .rxattrwalk(let size):
            out.p9Write(size)
        case .txattrcreate(let fid, let name, let size, let flags):
            out.p9Write(fid)
            out.p9Write(name)
            out.p9Write(size)
            out.p9Write(flags)
        case .tzc(let z):
            z.encodeBody(into: &out)
        case .rzc(_, let count):
            out.p9Write(count)
        }
        out.setInteger(UInt32(out.writerIndex - start), at: start, endianness: .little)
    }

    /// The encoded size, without encoding (used to keep replies within msize).
    public var encodedSize: Int {
        var b = ByteBufferAllocator().buffer(capacity: 0)
        switch message {
        case .rread(let d), .rreaddir(let d): return P9.headerSize + 4 + d.readableBytes
        case .twrite(_, _, let d): return P9.headerSize + 16 + d.readableBytes
        default:
            encode(into: &b)
            return b.readableBytes
        }
    }
}

/// Cuts the byte stream into whole 9P messages. The length prefix counts itself, little-endian.
/// Frames larger than `maxFrameSize` or shorter than a header are a protocol violation.
public struct P9FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer
    public var maxFrameSize: Int

    public init(maxFrameSize: Int = Int(P9.maxMsize)) {
        self.maxFrameSize = maxFrameSize
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let size = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else {
            return .needMoreData
        }
        guard size >= UInt32(P9.headerSize) else { throw P9DecodeError("message size \(size) below header size") }
        guard size <= UInt32(maxFrameSize) else { throw P9DecodeError("message size \(size) above \(maxFrameSize)") }
        guard let frame = buffer.readSlice(length: Int(size)) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer,
                                    seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        if buffer.readableBytes > 0 {
            throw P9DecodeError("connection closed inside a message (\(buffer.readableBytes) bytes left)")
        }
        return .needMoreData
    }
}

/// Encodes outbound frames.
public struct P9FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = P9Frame
    public init() {}
    public func encode(data: P9Frame, out: inout ByteBuffer) throws {
        data.encode(into: &out)
    }
}

extension P9DirEntry {
    /// Parses an Rreaddir payload.
    public static func parse(_ data: ByteBuffer) throws -> [P9DirEntry] {
        var r = P9Reader(buffer: data)
        var out: [P9DirEntry] = []
        while r.buffer.readableBytes > 0 {
            out.append(P9DirEntry(qid: try r.qid(), offset: try r.u64(), type: try r.u8(), name: try r.string()))
        }
        return out
    }
}
