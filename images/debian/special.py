#!/usr/bin/env python3
"""Prints the debugfs commands that add to an ext4 image what a user namespace cannot make when
the root file system tarball on stdin is extracted there: device nodes (with their modes and
owners) and security.* extended attributes (file capabilities). Values go to files in SCRATCH.

Usage: zstd -dc root.tar.zst | special.py SCRATCH > cmds.debugfs; debugfs -w -f cmds.debugfs IMG
"""
import os, stat, sys, tarfile

scratch = sys.argv[1]
n = 0
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
    for m in tar:
        path = "/" + os.path.normpath(m.name).lstrip("./") if m.name not in (".", "./") else "/"
        q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if m.ischr() or m.isblk():
            d, base = os.path.split(path)
            print(f"cd {q(d or '/')}")
            print(f"mknod {q(base)} {'c' if m.ischr() else 'b'} {m.devmajor} {m.devminor}")
            print("cd /")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            print(f"sif {q(path)} mode 0{kind | m.mode:o}")
            print(f"sif {q(path)} uid {m.uid}")
            print(f"sif {q(path)} gid {m.gid}")
        for k, v in m.pax_headers.items():
            if k.startswith("SCHILY.xattr.security."):
                n += 1
                f = os.path.join(scratch, f"xattr-{n}")
                with open(f, "wb") as out:
                    out.write(v.encode("utf-8", "surrogateescape"))
                print(f"ea_set -f {q(f)} {q(path)} {k[len('SCHILY.xattr.'):]}")
