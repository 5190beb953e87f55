import CFuse
import Glibc
import NIOCore
import Plan9
import Wire

/// The one file system of this process, for libfuse's C callbacks (which cannot capture).
nonisolated(unsafe) private var mounted: MountFS!

/// `uvm mount` in the process that serves the mount.
public enum HostMount {
    /// Connects to the guest once (starting uvmd, the VM and the instance as needed), so that a
    /// wrong distro or a guest that cannot serve is said before anything is mounted; then mounts
    /// `directory` and calls `ready` (with nil, or the reason it failed) once the mount is up.
    /// Returns when the file system is unmounted (`uvm unmount`, fusermount3 -u) or on SIGTERM.
    public static func run(request: FilesRequest, directory: String, connectToDaemon: @escaping @Sendable () throws -> CInt,
                           ready: (String?) -> Void) -> Int32 {
        let link = MountLink(request: request, connectToDaemon: connectToDaemon)
        do {
            _ = try link.begin()
            link.end()
        } catch let e as MountError {
            ready(e.message ?? "cannot reach the guest: \(String(cString: strerror(e.errno)))")
            return 1
        } catch {
            ready("cannot reach the guest: \(error)")
            return 1
        }
        mounted = MountFS(link: link)
        let name = request.distro ?? "default"
        let argv = ["uvm", "-o", "fsname=uvm:\(name),subtype=uvm"]
        var cargs = argv.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        var ops = operations()
        let status: Int32 = cargs.withUnsafeMutableBufferPointer { p in
            var args = fuse_args(argc: Int32(p.count), argv: p.baseAddress, allocated: 0)
            defer { fuse_opt_free_args(&args) }
            guard let fuse = uvm_fuse_new(&args, &ops, nil) else {
                ready("libfuse refused its options")
                return 1
            }
            defer { fuse_destroy(fuse) }
            guard fuse_mount(fuse, directory) == 0 else {
                ready("cannot mount on \(directory) (is fuse3's fusermount3 installed, and /dev/fuse there?)")
                return 1
            }
            let session = fuse_get_session(fuse)
            _ = fuse_set_signal_handlers(session)
            ready(nil)
            let rc = uvm_fuse_loop_mt(fuse, 10)
            fuse_remove_signal_handlers(session)
            fuse_unmount(fuse)
            return rc == 0 ? 0 : 1
        }
        link.shutdown()
        return status
    }

    static func operations() -> fuse_operations {
        var o = fuse_operations()
        o.`init` = { _, cfg in
            if let cfg {
                cfg.pointee.use_ino = 1
                cfg.pointee.attr_timeout = 1
                cfg.pointee.entry_timeout = 1
                cfg.pointee.negative_timeout = 0
            }
            return nil
        }
        o.getattr = { path, st, fi in
            guard let st else { return -EINVAL }
            if let fi, fi.pointee.fh != 0 {
                return mounted.withHandle(fi) { h in try mounted.getattr(h.session, fid: h.fid, into: st) }
            }
            return mounted.op { s in try mounted.withFid(s, MountFS.names(path)) { try mounted.getattr(s, fid: $0, into: st) } }
        }
        o.readlink = { path, buf, size in
            guard let buf, size > 0 else { return -EINVAL }
            return mounted.op { s in
                try mounted.withFid(s, MountFS.names(path)) { fid in
                    guard case .rreadlink(let target) = try mounted.link.call(s, .treadlink(fid: fid)) else { throw MountError(EIO) }
                    let n = min(target.bytes.count, size - 1)
                    target.bytes.withUnsafeBytes { raw in
                        if n > 0 { UnsafeMutableRawPointer(buf).copyMemory(from: raw.baseAddress!, byteCount: n) }
                    }
                    buf[n] = 0
                    return 0
                }
            }
        }
        o.mkdir = { path, mode in
            mounted.op { s in
                let (parent, name) = try MountFS.split(path)
                return try mounted.withFid(s, parent) { dfid in
                    guard case .rmkdir = try mounted.link.call(s, .tmkdir(dfid: dfid, name: name, mode: UInt32(mode), gid: P9.noUname)) else { throw MountError(EIO) }
                    return 0
                }
            }
        }
        o.unlink = { path in HostMount.remove(path, flags: 0) }
        o.rmdir = { path in HostMount.remove(path, flags: P9.atRemoveDir) }
        o.symlink = { target, path in
            guard let target else { return -EINVAL }
            return mounted.op { s in
                let (parent, name) = try MountFS.split(path)
                return try mounted.withFid(s, parent) { dfid in
                    guard case .rsymlink = try mounted.link.call(s, .tsymlink(dfid: dfid, name: name, target: P9String(String(cString: target)), gid: P9.noUname)) else { throw MountError(EIO) }
                    return 0
                }
            }
        }
        o.rename = { from, to, flags in
            guard flags == 0 else { return -EINVAL }
            return mounted.op { s in
                let (fromParent, fromName) = try MountFS.split(from)
                let (toParent, toName) = try MountFS.split(to)
                return try mounted.withFid(s, fromParent) { ofid in
                    try mounted.withFid(s, toParent) { nfid in
                        guard case .rrenameat = try mounted.link.call(s, .trenameat(olddirfid: ofid, oldname: fromName, newdirfid: nfid, newname: toName)) else { throw MountError(EIO) }
                        return 0
                    }
                }
            }
        }
        o.link = { from, to in
            mounted.op { s in
                let (parent, name) = try MountFS.split(to)
                return try mounted.withFid(s, MountFS.names(from)) { fid in
                    try mounted.withFid(s, parent) { dfid in
                        guard case .rlink = try mounted.link.call(s, .tlink(dfid: dfid, fid: fid, name: name)) else { throw MountError(EIO) }
                        return 0
                    }
                }
            }
        }
        o.chmod = { path, mode, fi in
            mounted.setattr(path: path, fi: fi, P9SetAttr(valid: P9.SetattrMask.mode, mode: UInt32(mode)))
        }
        o.chown = { path, uid, gid, fi in
            var a = P9SetAttr()
            // You on the host are the user the guest serves as.
            if uid != uid_t.max { a.valid |= P9.SetattrMask.uid; a.uid = uid == mounted.hostUID ? HostMount.ownerUID() : uid }
            if gid != gid_t.max { a.valid |= P9.SetattrMask.gid; a.gid = gid == mounted.hostGID ? HostMount.ownerGID() : gid }
            return mounted.setattr(path: path, fi: fi, a)
        }
        o.truncate = { path, size, fi in
            guard size >= 0 else { return -EINVAL }
            return mounted.setattr(path: path, fi: fi, P9SetAttr(valid: P9.SetattrMask.size, size: UInt64(size)))
        }
        o.utimens = { path, tv, fi in
            var a = P9SetAttr()
            let utimeNow = (1 << 30) - 1, utimeOmit = (1 << 30) - 2
            if let tv {
                let at = tv[0], mt = tv[1]
                if at.tv_nsec != utimeOmit {
                    a.valid |= P9.SetattrMask.atime
                    if at.tv_nsec != utimeNow { a.valid |= P9.SetattrMask.atimeSet; a.atimeSec = UInt64(bitPattern: Int64(at.tv_sec)); a.atimeNsec = UInt64(at.tv_nsec) }
                }
                if mt.tv_nsec != utimeOmit {
                    a.valid |= P9.SetattrMask.mtime
                    if mt.tv_nsec != utimeNow { a.valid |= P9.SetattrMask.mtimeSet; a.mtimeSec = UInt64(bitPattern: Int64(mt.tv_sec)); a.mtimeNsec = UInt64(mt.tv_nsec) }
                }
            } else {
                a.valid = P9.SetattrMask.atime | P9.SetattrMask.mtime
            }
            return mounted.setattr(path: path, fi: fi, a)
        }
        o.open = { path, fi in
            let flags = MountFS.openFlags(fi?.pointee.flags ?? 0)
            return mounted.openHandle(fi) { s in
                let fid = try mounted.walk(s, MountFS.names(path))
                do {
                    guard case .rlopen = try mounted.link.call(s, .tlopen(fid: fid, flags: flags)) else { throw MountError(EIO) }
                } catch {
                    mounted.clunk(s, fid)
                    throw error
                }
                return fid
            }
        }
        o.create = { path, mode, fi in
            let flags = MountFS.openFlags(fi?.pointee.flags ?? 0)
            return mounted.openHandle(fi) { s in
                let (parent, name) = try MountFS.split(path)
                let fid = try mounted.walk(s, parent)
                do {
                    // The fid becomes the new, open file.
                    guard case .rlcreate = try mounted.link.call(s, .tlcreate(fid: fid, name: name, flags: flags, mode: UInt32(mode & 0o7777), gid: P9.noUname)) else { throw MountError(EIO) }
                } catch {
                    mounted.clunk(s, fid)
                    throw error
                }
                return fid
            }
        }
        o.read = { _, buf, size, offset, fi in
            guard let buf, offset >= 0 else { return -EINVAL }
            return mounted.withHandle(fi) { h in try mounted.read(h, into: buf, size: size, offset: Int(offset)) }
        }
        o.write = { _, buf, size, offset, fi in
            guard let buf, offset >= 0 else { return -EINVAL }
            return mounted.withHandle(fi) { h in try mounted.write(h, from: buf, size: size, offset: Int(offset)) }
        }
        o.statfs = { _, out in
            guard let out else { return -EINVAL }
            return mounted.op { s in
                guard case .rstatfs(let f) = try mounted.link.call(s, .tstatfs(fid: MountSession.rootFid)) else { throw MountError(EIO) }
                var v = statvfs()
                v.f_bsize = UInt(f.bsize)
                v.f_frsize = UInt(f.bsize)
                v.f_blocks = UInt(truncatingIfNeeded: f.blocks)
                v.f_bfree = UInt(truncatingIfNeeded: f.bfree)
                v.f_bavail = UInt(truncatingIfNeeded: f.bavail)
                v.f_files = UInt(truncatingIfNeeded: f.files)
                v.f_ffree = UInt(truncatingIfNeeded: f.ffree)
                v.f_favail = UInt(truncatingIfNeeded: f.ffree)
                v.f_namemax = UInt(min(f.namelen, 255))
                out.pointee = v
                return 0
            }
        }
        o.flush = { _, _ in 0 }
        o.release = { _, fi in mounted.release(fi) }
        o.fsync = { _, datasync, fi in
            mounted.withHandle(fi) { h in
                guard case .rfsync = try mounted.link.call(h.session, .tfsync(fid: h.fid, datasync: datasync != 0 ? 1 : 0)) else { throw MountError(EIO) }
                return 0
            }
        }
        o.opendir = { path, fi in
            mounted.openHandle(fi) { s in
                let fid = try mounted.walk(s, MountFS.names(path))
                do {
                    guard case .rlopen = try mounted.link.call(s, .tlopen(fid: fid, flags: P9.OpenFlags.rdonly)) else { throw MountError(EIO) }
                } catch {
                    mounted.clunk(s, fid)
                    throw error
                }
                return fid
            }
        }
        o.readdir = { _, buf, filler, offset, fi, _ in
            mounted.withHandle(fi) { h in try mounted.readdir(h, buf: buf, filler: filler, offset: Int(offset)) }
        }
        o.releasedir = { _, fi in mounted.release(fi) }
        return o
    }

    private static func remove(_ path: UnsafePointer<CChar>?, flags: UInt32) -> Int32 {
        mounted.op { s in
            let (parent, name) = try MountFS.split(path)
            return try mounted.withFid(s, parent) { dfid in
                guard case .runlinkat = try mounted.link.call(s, .tunlinkat(dirfid: dfid, name: name, flags: flags)) else { throw MountError(EIO) }
                return 0
            }
        }
    }

    private static func ownerUID() -> UInt32 { mounted.link.owner?.uid ?? mounted.hostUID }
    private static func ownerGID() -> UInt32 { mounted.link.owner?.gid ?? mounted.hostGID }
}
