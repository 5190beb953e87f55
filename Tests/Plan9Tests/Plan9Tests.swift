import NIOCore
import Testing

@testable import Plan9

@Suite("Codec")
struct CodecTests {
    static let q = Qid(type: P9.QidType.dir, version: 7, path: 0x1234_5678_9ABC)

    static let samples: [P9Message] = {
        var attr = P9Attr()
        attr.valid = P9.GetattrMask.all
        attr.qid = q
        attr.mode = 0o40755
        attr.size = 4096
        attr.mtimeSec = 1_700_000_000
        var sfs = P9StatFS()
        sfs.type = 0xEF53
        sfs.bsize = 4096
        sfs.fsid = 42
        return [
            .tversion(msize: 8192, version: "9P2000.L"), .rversion(msize: 8192, version: "9P2000.L"),
            .tattach(fid: 1, afid: P9.noFid, uname: "root", aname: "", nUname: 0), .rattach(qid: q),
            .rlerror(ecode: 2), .tflush(oldtag: 9), .rflush,
            .twalk(fid: 1, newfid: 2, names: ["a", "b\u{ff}"]), .rwalk(qids: [q, q]),
            .tlopen(fid: 2, flags: 0o2), .rlopen(qid: q, iounit: 0),
            .tlcreate(fid: 2, name: "n", flags: 0o102, mode: 0o644, gid: 5), .rlcreate(qid: q, iounit: 1),
            .tread(fid: 2, offset: 1 << 40, count: 100), .rread(data: ByteBuffer(bytes: [1, 2, 3])),
            .twrite(fid: 2, offset: 5, data: ByteBuffer(bytes: [9, 8])), .rwrite(count: 2),
            .tclunk(fid: 2), .rclunk, .tremove(fid: 3), .rremove, .tstatfs(fid: 1), .rstatfs(sfs),
            .tgetattr(fid: 1, mask: P9.GetattrMask.all), .rgetattr(attr),
            .tsetattr(fid: 1, attr: P9SetAttr(valid: 1, mode: 0o600, size: 10)), .rsetattr,
            .tuvmsetattr(fid: 1, attr: P9SetAttr(valid: 1, mode: 0o600, size: 10)), .ruvmsetattr(attr),
            .tuvmlcreate(dfid: 1, ofid: 2, pfid: 3, name: "n", flags: 0o302, mode: 0o644, gid: 5),
            .ruvmlcreate(iounit: 4096, attr: attr, dir: attr),
            .tuvmclunk(fids: [2, 7, 0xffff_fffe]), .ruvmclunk, .tuvmclunk(fids: []),
            .treaddir(fid: 1, offset: 77, count: 4096), .rreaddir(data: ByteBuffer(bytes: [0, 1])),
            .tfsync(fid: 1, datasync: 1), .rfsync,
            .tmkdir(dfid: 1, name: "d", mode: 0o755, gid: 0), .rmkdir(qid: q),
            .tmknod(dfid: 1, name: "p", mode: 0o10644, major: 0, minor: 0, gid: 0), .rmknod(qid: q),
            .tsymlink(dfid: 1, name: "l", target: "/etc", gid: 0), .rsymlink(qid: q),
            .treadlink(fid: 1), .rreadlink(target: "x/y"),
            .tlink(dfid: 1, fid: 2, name: "h"), .rlink,
            .trename(fid: 2, dfid: 1, name: "r"), .rrename,
            .trenameat(olddirfid: 1, oldname: "a", newdirfid: 1, newname: "b"), .rrenameat,
            .tunlinkat(dirfid: 1, name: "a", flags: 0x200), .runlinkat,
            .tlock(fid: 1, lock: P9Lock(type: 1, flags: 1, start: 0, length: 10, procID: 4, clientID: "c")),
            .rlock(status: 1),
            .tgetlock(fid: 1, lock: P9Lock(type: 0, start: 2, length: 3, procID: 4, clientID: "c")),
            .rgetlock(lock: P9Lock(type: 2, start: 2, length: 3, procID: 4, clientID: "c")),
            .txattrwalk(fid: 1, newfid: 2, name: "user.x"), .rxattrwalk(size: 12),
            .txattrcreate(fid: 1, name: "user.x", size: 3, flags: 0), .rxattrcreate,
        ]
    }()

    @Test("every message survives encode and decode", arguments: samples)
    func roundTrip(_ m: P9Message) throws {
        var b = ByteBuffer()
        let f = P9Frame(tag: 42, message: m)
        f.encode(into: &b)
        #expect(b.getInteger(at: 0, endianness: .little, as: UInt32.self) == UInt32(b.readableBytes))
        #expect(f.encodedSize == b.readableBytes)
        #expect(try P9Frame.decode(b) == f)
    }

    @Test func truncatedAndTrailingBytesAreRejected() throws {
        var b = ByteBuffer()
        P9Frame(tag: 1, message: .twalk(fid: 1, newfid: 2, names: ["abc"])).encode(into: &b)
        let full = Array(b.readableBytesView)
        for cut in 7..<full.count {
            var t = ByteBuffer(bytes: full[0..<cut])
            t.setInteger(UInt32(cut), at: 0, endianness: .little)
            #expect(throws: P9DecodeError.self) { try P9Frame.decode(t) }
        }
        var extra = ByteBuffer(bytes: full + [0])
        extra.setInteger(UInt32(full.count + 1), at: 0, endianness: .little)
        #expect(throws: P9DecodeError.self) { try P9Frame.decode(extra) }
    }

    @Test func unknownTypeIsAnErrorAndLegacyTypesAreUnsupported() throws {
        var b = ByteBuffer(bytes: [7, 0, 0, 0, 250, 1, 0])
        #expect(throws: P9DecodeError.self) { try P9Frame.decode(b) }
        b = ByteBuffer(bytes: [9, 0, 0, 0, 112, 1, 0, 0, 0])  // Topen
        #expect(try P9Frame.decode(b).message == .unsupported(type: 112))
    }

    @Test func walkOfMoreThanSixteenNamesIsRejected() throws {
        var b = ByteBuffer()
        P9Frame(tag: 1, message: .twalk(fid: 1, newfid: 2, names: Array(repeating: "a", count: 17))).encode(into: &b)
        #expect(throws: P9DecodeError.self) { try P9Frame.decode(b) }
    }

    @Test func qidPathsAreUniqueAcrossDevices() {
        let m = QidMapper(rootDev: 10)
        let a = m.path(dev: 10, ino: 5)
        let b = m.path(dev: 11, ino: 5)
        #expect(a == 5)
        #expect(a != b)
        #expect(m.path(dev: 11, ino: 5) == b)
        let big1 = m.path(dev: 10, ino: 1 << 50)
        let big2 = m.path(dev: 11, ino: 1 << 50)
        #expect(big1 != big2)
        #expect(Set([a, b, big1, big2]).count == 4)
        #expect(m.path(dev: 10, ino: 1 << 50) == big1)
    }
}
