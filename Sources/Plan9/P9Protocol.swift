import NIOCore

/// Wire constants of 9P2000.L, as the Linux client (include/net/9p/9p.h) uses them.
public enum P9 {
    public static let version = "9P2000.L"
    public static let noTag: UInt16 = 0xFFFF
    public static let noFid: UInt32 = 0xFFFF_FFFF
    public static let noUname: UInt32 = 0xFFFF_FFFF
    /// size[4] type[1] tag[2]
    public static let headerSize = 7
    /// Room the client reserves for a Tread/Twrite header; data per message is msize minus this.
    public static let ioHeaderSize = 24
    public static let maxWalkElements = 16
    /// The largest msize the server agrees to (the kernel's fd transport allows up to 1 MiB).
    public static let maxMsize: UInt32 = 1 << 20
    /// With zero copy (the uvmshm transport's Tzc): 1 MiB of data per message plus the header.
    public static let zeroCopyMaxMsize: UInt32 = (1 << 20) + 4096
    /// The Linux client refuses anything smaller.
    public static let minMsize: UInt32 = 4096

    public enum QidType {
        public static let dir: UInt8 = 0x80
        public static let symlink: UInt8 = 0x02
        public static let file: UInt8 = 0x00
    }

    /// Tlopen/Tlcreate flags (P9_DOTL_*): Linux's generic O_* values, spelled out so the server does
    /// not depend on the host architecture's numbering.
    public enum OpenFlags {
        public static let accessMask: UInt32 = 0o3
        public static let rdonly: UInt32 = 0o0
        public static let wronly: UInt32 = 0o1
        public static let rdwr: UInt32 = 0o2
        public static let create: UInt32 = 0o100
        public static let excl: UInt32 = 0o200
        public static let noctty: UInt32 = 0o400
        public static let trunc: UInt32 = 0o1000
        public static let append: UInt32 = 0o2000
        public static let nonblock: UInt32 = 0o4000
        public static let dsync: UInt32 = 0o10000
        public static let fasync: UInt32 = 0o20000
        public static let direct: UInt32 = 0o40000
        public static let largefile: UInt32 = 0o100000
        public static let directory: UInt32 = 0o200000
        public static let nofollow: UInt32 = 0o400000
        public static let noatime: UInt32 = 0o1000000
        public static let cloexec: UInt32 = 0o2000000
        public static let sync: UInt32 = 0o4000000
    }

    /// Tgetattr request_mask / Rgetattr valid bits.
    public enum GetattrMask {
        public static let mode: UInt64 = 0x1
        public static let nlink: UInt64 = 0x2
        public static let uid: UInt64 = 0x4
        public static let gid: UInt64 = 0x8
        public static let rdev: UInt64 = 0x10
        public static let atime: UInt64 = 0x20
        public static let mtime: UInt64 = 0x40
        public static let ctime: UInt64 = 0x80
        public static let ino: UInt64 = 0x100
        public static let size: UInt64 = 0x200
        public static let blocks: UInt64 = 0x400
        public static let btime: UInt64 = 0x800
        public static let gen: UInt64 = 0x1000
        public static let dataVersion: UInt64 = 0x2000
        public static let basic: UInt64 = 0x7FF
        public static let all: UInt64 = 0x3FFF
    }

    /// Tsetattr valid bits.
    public enum SetattrMask {
        public static let mode: UInt32 = 1 << 0
        public static let uid: UInt32 = 1 << 1
        public static let gid: UInt32 = 1 << 2
        public static let size: UInt32 = 1 << 3
        public static let atime: UInt32 = 1 << 4
        public static let mtime: UInt32 = 1 << 5
        public static let ctime: UInt32 = 1 << 6
        public static let atimeSet: UInt32 = 1 << 7
        public static let mtimeSet: UInt32 = 1 << 8
    }

    public enum LockType {
        public static let rdlck: UInt8 = 0
        public static let wrlck: UInt8 = 1
        public static let unlck: UInt8 = 2
    }

    public enum LockStatus {
        public static let success: UInt8 = 0
        public static let blocked: UInt8 = 1
        public static let error: UInt8 = 2
        public static let grace: UInt8 = 3
    }

    public static let atRemoveDir: UInt32 = 0x200
}

/// A 9P string: bytes, not necessarily UTF-8 (Linux file names are arbitrary bytes).
public struct P9String: Hashable, Sendable, ExpressibleByStringLiteral, CustomStringConvertible {
    public var bytes: [UInt8]
    public init(bytes: [UInt8]) { self.bytes = bytes }
    public init(_ string: String) { self.bytes = Array(string.utf8) }
    public init(stringLiteral value: String) { self.init(value) }
    public var description: String { String(decoding: bytes, as: UTF8.self) }
}

public struct Qid: Hashable, Sendable {
    public var type: UInt8
    public var version: UInt32
    public var path: UInt64
    public init(type: UInt8, version: UInt32 = 0, path: UInt64) {
        self.type = type
        self.version = version
        self.path = path
    }
    public static let wireSize = 13
}

public struct P9Attr: Hashable, Sendable {
    public var valid: UInt64 = 0
    public var qid = Qid(type: 0, path: 0)
    public var mode: UInt32 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var nlink: UInt64 = 0
    public var rdev: UInt64 = 0
    public var size: UInt64 = 0
    public var blksize: UInt64 = 0
    public var blocks: UInt64 = 0
    public var atimeSec: UInt64 = 0
    public var atimeNsec: UInt64 = 0
    public var mtimeSec: UInt64 = 0
    public var mtimeNsec: UInt64 = 0
    public var ctimeSec: UInt64 = 0
    public var ctimeNsec: UInt64 = 0
    public var btimeSec: UInt64 = 0
    public var btimeNsec: UInt64 = 0
    public var gen: UInt64 = 0
    public var dataVersion: UInt64 = 0
    public init() {}
}

public struct P9SetAttr: Hashable, Sendable {
    public var valid: UInt32 = 0
    public var mode: UInt32 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var size: UInt64 = 0
    public var atimeSec: UInt64 = 0
    public var atimeNsec: UInt64 = 0
    public var mtimeSec: UInt64 = 0
    public var mtimeNsec: UInt64 = 0
    public init(valid: UInt32 = 0, mode: UInt32 = 0, uid: UInt32 = 0, gid: UInt32 = 0, size: UInt64 = 0,
                atimeSec: UInt64 = 0, atimeNsec: UInt64 = 0, mtimeSec: UInt64 = 0, mtimeNsec: UInt64 = 0) {
        self.valid = valid
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.atimeSec = atimeSec
        self.atimeNsec = atimeNsec
        self.mtimeSec = mtimeSec
        self.mtimeNsec = mtimeNsec
    }
}

public struct P9StatFS: Hashable, Sendable {
    public var type: UInt32 = 0
    public var bsize: UInt32 = 0
    public var blocks: UInt64 = 0
    public var bfree: UInt64 = 0
    public var bavail: UInt64 = 0
    public var files: UInt64 = 0
    public var ffree: UInt64 = 0
    public var fsid: UInt64 = 0
    public var namelen: UInt32 = 0
    public init() {}
}

/// Tlock's body (and Tgetlock/Rgetlock, which have no flags).
public struct P9Lock: Hashable, Sendable {
    public var type: UInt8
    public var flags: UInt32
    public var start: UInt64
    public var length: UInt64
    public var procID: UInt32
    public var clientID: P9String
    public init(type: UInt8, flags: UInt32 = 0, start: UInt64 = 0, length: UInt64 = 0, procID: UInt32 = 0,
                clientID: P9String = "") {
        self.type = type
        self.flags = flags
        self.start = start
        self.length = length
        self.procID = procID
        self.clientID = clientID
    }
}

/// One directory entry of an Rreaddir payload.
public struct P9DirEntry: Hashable, Sendable {
    public var qid: Qid
    public var offset: UInt64
    public var type: UInt8
    public var name: P9String
    public init(qid: Qid, offset: UInt64, type: UInt8, name: P9String) {
        self.qid = qid
        self.offset = offset
        self.type = type
        self.name = name
    }
    public var wireSize: Int { Qid.wireSize + 8 + 1 + 2 + name.bytes.count }
}

/// Every 9P2000.L message the Linux client sends or expects, plus the legacy remove/rename.
public enum P9Message: Sendable, Equatable {
    case tversion(msize: UInt32, version: P9String)
    case rversion(msize: UInt32, version: P9String)
    case tattach(fid: UInt32, afid: UInt32, uname: P9String, aname: P9String, nUname: UInt32)
    case rattach(qid: Qid)
    case rlerror(ecode: UInt32)
    case tflush(oldtag: UInt16)
    case rflush
    case twalk(fid: UInt32, newfid: UInt32, names: [P9String])
    case rwalk(qids: [Qid])
    case tlopen(fid: UInt32, flags: UInt32)
    case rlopen(qid: Qid, iounit: UInt32)
    case tlcreate(fid: UInt32, name: P9String, flags: UInt32, mode: UInt32, gid: UInt32)
    case rlcreate(qid: Qid, iounit: UInt32)
    case tread(fid: UInt32, offset: UInt64, count: UInt32)
    case rread(data: ByteBuffer)
    case twrite(fid: UInt32, offset: UInt64, data: ByteBuffer)
    case rwrite(count: UInt32)
    case tclunk(fid: UInt32)
    case rclunk
    case tremove(fid: UInt32)
    case rremove
    case tstatfs(fid: UInt32)
    case rstatfs(P9StatFS)
    case tgetattr(fid: UInt32, mask: UInt64)
    case rgetattr(P9Attr)
    case tsetattr(fid: UInt32, attr: P9SetAttr)
    case rsetattr
    case treaddir(fid: UInt32, offset: UInt64, count: UInt32)
    case rreaddir(data: ByteBuffer)
    case tfsync(fid: UInt32, datasync: UInt32)
    case rfsync
    case tmkdir(dfid: UInt32, name: P9String, mode: UInt32, gid: UInt32)
    case rmkdir(qid: Qid)
    case tmknod(dfid: UInt32, name: P9String, mode: UInt32, major: UInt32, minor: UInt32, gid: UInt32)
    case rmknod(qid: Qid)
    case tsymlink(dfid: UInt32, name: P9String, target: P9String, gid: UInt32)
    case rsymlink(qid: Qid)
    case treadlink(fid: UInt32)
    case rreadlink(target: P9String)
    case tlink(dfid: UInt32, fid: UInt32, name: P9String)
    case rlink
    case trename(fid: UInt32, dfid: UInt32, name: P9String)
    case rrename
    case trenameat(olddirfid: UInt32, oldname: P9String, newdirfid: UInt32, newname: P9String)
    case rrenameat
    case tunlinkat(dirfid: UInt32, name: P9String, flags: UInt32)
    case runlinkat
    case tlock(fid: UInt32, lock: P9Lock)
    case rlock(status: UInt8)
    case tgetlock(fid: UInt32, lock: P9Lock)
    case rgetlock(lock: P9Lock)
    case txattrwalk(fid: UInt32, newfid: UInt32, name: P9String)
    case rxattrwalk(size: UInt64)
    case txattrcreate(fid: UInt32, name: P9String, size: UInt64, flags: UInt32)
    case rxattrcreate
    /// uvm's extension (kernel-patches/0006): the guest, mounted with cache=meta, asks to be told
    /// of host-side changes; they come as Ruvmnotify with tag NOTAG (see `P9Note`).
    case tuvmnotify(flags: UInt32)
    case ruvmnotify(notes: [P9Note])
    /// uvm's extension: Tsetattr answered with the attributes it left (Rgetattr's body), so a
    /// cache=meta guest keeps them instead of asking again at its next lookup (tar: chown, chmod,
    /// utimes, each a lookup of the entry the previous one changed). Sent only to a server that
    /// took Tuvmnotify; a server without it answers EOPNOTSUPP and gets Tsetattr from then on.
    case tuvmsetattr(fid: UInt32, attr: P9SetAttr)
    case ruvmsetattr(P9Attr)
    /// uvm's extension: Tlcreate that leaves `dfid` as it is, opens the new file as `ofid` and
    /// binds `pfid` (unopened) to it, and answers with its attributes and then the directory's
    /// (Rgetattr's body twice): what a cache=meta guest otherwise asks in five requests (clone
    /// the directory's fid, create, walk to the new entry, getattr, and the directory's getattr
    /// at its next stat). Sent only to a server that took Tuvmnotify; EOPNOTSUPP from a server
    /// without it gets the separate requests from then on.
    case tuvmlcreate(dfid: UInt32, ofid: UInt32, pfid: UInt32, name: P9String, flags: UInt32, mode: UInt32, gid: UInt32)
    case ruvmlcreate(iounit: UInt32, attr: P9Attr, dir: P9Attr)
    /// uvm's extension: Tclunk of several fids (count[2] fid[4]*count), each clunked as Tclunk
    /// would be, and answered as one: Rlerror with the first failure, after all were tried. A
    /// guest gives fids back in batches (the entries it no longer caches, the files it closed),
    /// one round trip for many. EOPNOTSUPP from a server without it gets one Tclunk per fid.
    case tuvmclunk(fids: [UInt32])
    case ruvmclunk
    /// A T-message of legacy 9P2000/9P2000.u that 9P2000.L has no use for (Tauth, Topen, Tcreate,
    /// Tstat, Twstat): answered with Rlerror(EOPNOTSUPP), body not parsed.
    case unsupported(type: UInt8)
    /// uvm's zero-copy Tread/Treaddir/Twrite: the payload is in the guest pages it names.
    case tzc(P9ZeroCopyRequest)
    /// Its answer: the op's reply type with the count alone (the data is in the guest's pages).
    case rzc(type: UInt8, count: UInt32)
}

extension P9Message {
    /// The numeric message type on the wire.
    public var typeCode: UInt8 {
        switch self {
        case .rlerror: return 7
        case .tstatfs: return 8
        case .rstatfs: return 9
        case .tlopen: return 12
        case .rlopen: return 13
        case .tlcreate: return 14
        case .rlcreate: return 15
        case .tsymlink: return 16
        case .rsymlink: return 17
        case .tmknod: return 18
        case .rmknod: return 19
        case .trename: return 20
        case .rrename: return 21
        case .treadlink: return 22
        case .rreadlink: return 23
        case .tgetattr: return 24
        case .rgetattr: return 25
        case .tsetattr: return 26
        case .rsetattr: return 27
        case .txattrwalk: return 30
        case .rxattrwalk: return 31
        case .txattrcreate: return 32
        case .rxattrcreate: return 33
        case .treaddir: return 40
        case .rreaddir: return 41
        case .tfsync: return 50
        case .rfsync: return 51
        case .tlock: return 52
        case .rlock: return 53
        case .tgetlock: return 54
        case .rgetlock: return 55
        case .tlink: return 70
        case .rlink: return 71
        case .tmkdir: return 72
        case .rmkdir: return 73
        case .trenameat: return 74
        case .rrenameat: return 75
        case .tunlinkat: return 76
        case .runlinkat: return 77
        case .tuvmnotify: return 90
        case .ruvmnotify: return 91
        case .tuvmsetattr: return 92
        case .ruvmsetattr: return 93
        case .tuvmlcreate: return 94
        case .ruvmlcreate: return 95
        case .tuvmclunk: return 96
        case .ruvmclunk: return 97
        case .tversion: return 100
        case .rversion: return 101
        case .tattach: return 104
        case .rattach: return 105
        case .tflush: return 108
        case .rflush: return 109
        case .twalk: return 110
        case .rwalk: return 111
        case .tread: return 116
        case .rread: return 117
        case .twrite: return 118
        case .rwrite: return 119
        case .tclunk: return 120
        case .rclunk: return 121
        case .tremove: return 122
        case .rremove: return 123
        case .unsupported(let type): return type
        case .tzc: return P9ZeroCopyRequest.typeCode
        case .rzc(let type, _): return type
        }
    }
}

/// A message and its tag.
public struct P9Frame: Sendable, Equatable {
    public var tag: UInt16
    public var message: P9Message
    public init(tag: UInt16, message: P9Message) {
        self.tag = tag
        self.message = message
    }
}

/// Why a message could not be decoded. Any of these ends the session.
public struct P9DecodeError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// One cache invalidation pushed to a cache=meta guest (the kernel side is fs/9p/notify.c).
public struct P9Note: Sendable, Hashable {
    public enum Kind: UInt8, Sendable {
        /// The entry `name` of directory `path` was created, removed or renamed.
        case name = 1
        /// The attributes of the entry `name` of directory `path` changed.
        case attr = 2
        /// The attributes of `path` itself changed.
        case selfAttr = 3
        /// Anything may have changed: the guest drops its whole cache.
        case all = 4
        /// Directory `path` cannot be watched: the guest caches nothing in it.
        case uncached = 5
    }
    public var kind: Kind
    public var path: UInt64
    public var name: [UInt8]
    public init(_ kind: Kind, path: UInt64, name: [UInt8] = []) {
        self.kind = kind
        self.path = path
        self.name = name
    }
    /// kind[1] path[8] namelen[2] name
    public var wireSize: Int { 11 + name.count }
}

extension P9 {
    /// A request type's name as in the protocol's documents, without the T ("walk", "lcreate").
    public static func requestName(_ type: UInt8) -> String {
        let names: [UInt8: String] = [
            8: "statfs", 12: "lopen", 14: "lcreate", 16: "symlink", 18: "mknod", 20: "rename", 22: "readlink",
            24: "getattr", 26: "setattr", 30: "xattrwalk", 32: "xattrcreate", 40: "readdir", 50: "fsync",
            52: "lock", 54: "getlock", 70: "link", 72: "mkdir", 74: "renameat", 76: "unlinkat", 90: "uvmnotify",
            92: "setattr+getattr", 94: "lcreate+walk+getattr", 96: "clunk (batch)",
            100: "version", 104: "attach", 108: "flush", 110: "walk", 116: "read", 118: "write", 120: "clunk",
            122: "remove", 130: "zc",
        ]
        return names[type] ?? "type\(type)"
    }
}
