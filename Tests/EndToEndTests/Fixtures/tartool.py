#!/usr/bin/env python3
"""Tarballs for the import/export tests, written and read independently of uvm's own tar code.

  tartool.py augment IN OUT   IN's members plus ./rt/ holding every kind of entry a root file
                              system has (setuid, devices, fifo, hard links, xattrs, a file
                              capability, a 1 GiB sparse file, non-ASCII and long names)
  tartool.py listing TAR      one line per member: path type mode uid gid size link dev xattrs
                              sha256 mtime (JSON), sorted; GNU sparse members as their real file
  tartool.py rootless OUT     a tarball that is not a root file system (no /bin/sh)
"""
import hashlib
import io
import json
import sys
import tarfile

SPARSE_SIZE = 1 << 30
# Data extents of the sparse file: (offset, bytes).
SPARSE_EXTENTS = [(0, b"head" * 1024), (512 << 20, b"middle" * 2048), (SPARSE_SIZE - 8192, b"t" * 8192)]
# A v2 file capability: cap_net_raw (bit 13) permitted and effective.
CAPABILITY = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


def member(name, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1700000000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def sparse_member(name):
    """GNU sparse format 1.0, as GNU tar writes it: the map, padded to a block, then the data."""
    lines = [str(len(SPARSE_EXTENTS))] + [f"{o}\n{len(d)}" for o, d in SPARSE_EXTENTS]
    m = ("\n".join(lines) + "\n").encode()
    m += b"\0" * (-len(m) % 512)
    body = m + b"".join(d for _, d in SPARSE_EXTENTS)
    dirname, base = name.rsplit("/", 1)
    info = tarfile.TarInfo(f"{dirname}/GNUSparseFile.0/{base}")
    info.size = len(body)
    info.mode = 0o644
    info.mtime = 1700000000
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(SPARSE_SIZE)}
    return info, io.BytesIO(body)


def augment(src, dst):
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        entries = [
            member("./rt", tarfile.DIRTYPE, 0o755),
            member("./rt/setuid", mode=0o4755, uid=1234, gid=1234, data=b"#!/bin/sh\necho setuid\n"),
            member("./rt/setgid-dir", tarfile.DIRTYPE, 0o2775, gid=100),
            member("./rt/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
            member("./rt/loop9", tarfile.BLKTYPE, 0o660, gid=6, devmajor=7, devminor=9),
            member("./rt/fifo", tarfile.FIFOTYPE, 0o600, uid=4321),
            member("./rt/linked-a", data=b"one inode, two names\n"),
            member("./rt/linked-b", tarfile.LNKTYPE, 0o644, linkname="./rt/linked-a"),
            member("./rt/symlink", tarfile.SYMTYPE, 0o777, linkname="linked-a"),
            member("./rt/dangling", tarfile.SYMTYPE, 0o777, linkname="/nowhere/at/all"),
            member("./rt/xattr", data=b"tagged\n", pax_headers={"SCHILY.xattr.user.uvm-test": "hello xattr"}),
            member("./rt/ping", mode=0o755, data=b"\x7fELF-not-really\n",
                   pax_headers={"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape")}),
            member("./rt/ñandú-日本語.txt", data="non-ASCII name\n".encode()),
            member("./rt/" + "long-directory-name/" * 6 + "and-a-long-file-name.txt", data=b"long path\n"),
        ]
        # The long path's parents.
        for i in range(1, 7):
            entries.insert(-1, member("./rt/" + "/".join(["long-directory-name"] * i), tarfile.DIRTYPE, 0o755))
        entries.append(sparse_member("./rt/sparse"))
        for info, data in entries:
            tout.addfile(info, data)


def listing(path):
    out = []
    with tarfile.open(path) as t:
        for m in t:
            name = m.name[2:] if m.name.startswith("./") else m.name
            name = name.rstrip("/") or "."
            digest = ""
            if m.isreg():
                h = hashlib.sha256()
                f = t.extractfile(m)
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                digest = h.hexdigest()
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape").hex()
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            link = m.linkname
            if m.islnk() and link.startswith("./"):
                link = link[2:]
            out.append({"path": name, "type": m.type.decode(), "mode": oct(m.mode), "uid": m.uid, "gid": m.gid,
                        "size": m.size if m.isreg() else 0, "link": link,
                        "dev": [m.devmajor, m.devminor] if m.ischr() or m.isblk() else None,
                        "xattrs": xattrs, "sha256": digest, "mtime": int(m.mtime)})
    for e in sorted(out, key=lambda e: e["path"]):
        print(json.dumps(e, sort_keys=True, ensure_ascii=False))


def rootless(dst):
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as t:
        for info, data in [member("./etc", tarfile.DIRTYPE, 0o755), member("./etc/hostname", data=b"nothing\n")]:
            t.addfile(info, data)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "augment":
        augment(sys.argv[2], sys.argv[3])
    elif cmd == "listing":
        listing(sys.argv[2])
    elif cmd == "rootless":
        rootless(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
