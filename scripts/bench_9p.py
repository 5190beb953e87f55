#!/usr/bin/env python3
"""File-sharing benchmark: uvm's 9P server against diod and QEMU's virtio-9p, on one guest.

One VM is booted with five places to work in, all mounted with the same client options
(9p2000.L, cache=mmap, access=client, msize 512 KiB; ours 1 MiB + 4 KiB with zero copy):
  ours     a uvm share: our Plan9 server in uvmd, over the shared-memory transport (trans=uvmshm),
           with zero copy (the server reads and writes the guest's pages) unless UVM_9P_ZERO_COPY=0
  relay    the same server over a virtio-serial port and the agent's relay (the transport of a VM
           adopted from an earlier uvmd; `uvm share add --via-port`, a benchmark-only option)
  diod     Debian's diod as the server of a share, behind the same shared-memory transport
           (`uvm share add --server-command`, a benchmark-only option)
  virtio   QEMU's built-in virtio-9p (<filesystem> in the domain, UVM_BENCH_VIRTIO_9P)
  tmpfs    the guest's own /dev/shm: the limit
  host     the same operations run natively on the host, in a folder beside the shared ones: what
           the host's own file system costs (on these machines ext4 without a journal, where a
           create right after many deletions costs ~0.5 ms: it skips inodes freed in the last minute)
and on each: one waited request's round trip (fchmod of an open file, in us), sequential write and
read of 256 MiB, create+stat+unlink of 5,000 files, listing a
10,000-entry directory (names only, and with a stat of each), unpacking part of the kernel's
Documentation/ (admin-guide, filesystems, networking: a tar on the guest's tmpfs), and unpacking
the first 20,000 entries of the kernel's source then an lstat of every entry twice, as `git status`
does (the second pass is what the guest's metadata cache changes). Our shares are mounted with
cache=meta (the guest caches metadata, uvmd's change notes keep it true); relay cannot carry the
notes and falls back to cache=mmap, so it is also "ours without the cache". The 9P requests per
unpacked entry are counted by our server (`uvm share list --format json`). Times are in seconds,
measured inside the guest.
Results: bench-results/9p.{txt,json}. `--ops write,read --targets ours,virtio` runs only those;
`--host-dir DIR` puts the shared folders in DIR (default: $TMPDIR), e.g. a tmpfs to take the host
disk out of the comparison.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("UVM_BIN", os.path.join(ROOT, ".build/release"))
UVM = os.path.join(BIN, "uvm")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uvm")
LINUX_SOURCE = "/usr/src/linux-source-6.1.tar.xz"
MSIZE = 512 * 1024


def log(msg):
    print(f"bench-9p: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench-9p: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r


# A real source tree of ~800 files: all of Documentation/ (9,500 entries) takes over ten minutes
# per target under TCG.
DOC_PARTS = ["Documentation/admin-guide", "Documentation/filesystems", "Documentation/networking"]


def documentation_tar():
    """Part of the kernel's Documentation/ as a plain tar, extracted once and cached."""
    out = os.path.join(CACHE, "bench", "Documentation-part.tar")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log(f"extracting Documentation/ from {LINUX_SOURCE} (once)")
    work = tempfile.mkdtemp(prefix="uvm-bench-doc-")
    try:
        run(["tar", "-xJf", LINUX_SOURCE, "-C", work, "--wildcards", "*/Documentation/*"])
        top = os.path.join(work, os.listdir(work)[0])
        run(["tar", "-cf", out + ".partial", "-C", top, *DOC_PARTS])
        os.rename(out + ".partial", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def source_tree_tar(files):
    """The first `files` entries of the kernel's source as a plain tar, made once and cached."""
    import tarfile
    out = os.path.join(CACHE, "bench", f"linux-tree-{files}.tar")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log(f"taking the first {files} entries of {LINUX_SOURCE} (once)")
    with tarfile.open(LINUX_SOURCE, "r:xz") as src, tarfile.open(out + ".partial", "w", format=tarfile.GNU_FORMAT) as dst:
        n = 0
        for m in src:
            if not (m.isfile() or m.isdir() or m.issym()):
                continue
            m.name = "tree/" + m.name.split("/", 1)[-1] if "/" in m.name else "tree"
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            n += 1
            if n >= files:
                break
    os.rename(out + ".partial", out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--tree-files", type=int, default=20000, help="entries of the kernel source to unpack and stat")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    ap.add_argument("--rtts", type=int, default=2000, help="fchmod calls for the round-trip row")
    ap.add_argument("--ops", default="rtt,write,read,files,list,untar,tree", help="comma-separated subset of the default")
    ap.add_argument("--targets", default="ours,relay,diod,virtio,tmpfs,host", help="comma-separated subset of the default")
    ap.add_argument("--host-dir", help="where the shared folders are made (default: $TMPDIR)")
    a = ap.parse_args()
    ops = [o for o in a.ops.split(",") if o]
    chosen = [t for t in a.targets.split(",") if t]
    for o in ops:
        if o not in ("rtt", "write", "read", "files", "list", "untar", "tree"):
            sys.exit(f"bench-9p: unknown op {o}")
    for t in chosen:
        if t not in ("ours", "relay", "diod", "virtio", "tmpfs", "host"):
            sys.exit(f"bench-9p: unknown target {t}")
    os.makedirs(a.out, exist_ok=True)

    work = tempfile.mkdtemp(prefix="uvm-bench-9p-", dir=a.host_dir)
    home = os.path.join(work, "uvm")
    dirs = {k: os.path.join(work, k) for k in ("ours", "relay", "diod", "virtio", "host")}
    for d in dirs.values():
        os.makedirs(d)
    tools = os.path.join(work, "tools")
    os.makedirs(tools)
    run(["cc", "-static", "-O2", "-o", os.path.join(tools, "fsbench"), os.path.join(ROOT, "scripts/bench/fsbench.c")])
    shutil.copy(documentation_tar(), os.path.join(tools, "doc.tar"))
    shutil.copy(source_tree_tar(a.tree_files), os.path.join(tools, "tree.tar"))

    # No idle stops mid-run: the virtio-9p mount lives in the instance.
    env = dict(os.environ, UVM_HOME=home, UVMD_PATH=os.path.join(BIN, "uvmd"), UVM_HOME_SHARE="off",
               UVM_INSTANCE_IDLE_TIMEOUT="never", UVM_VM_IDLE_TIMEOUT="never",
               UVM_BENCH_VIRTIO_9P=dirs["virtio"])

    def uvm(*args):
        return run([UVM, *args], env=env, stdin=subprocess.DEVNULL, cwd="/")

    def guest(script):
        return uvm("exec", "--", "sh", "-c", script).stdout

    uvm("share", "add", "tools", tools, "--read-only")
    if "ours" in chosen:
        uvm("share", "add", "ours", dirs["ours"])
    if "relay" in chosen:
        uvm("share", "add", "relay", dirs["relay"], "--via-port")
    diod = shutil.which("diod") or "/usr/sbin/diod"
    if "diod" in chosen:
        uvm("share", "add", "diod", dirs["diod"], "--server-command",
            f"exec {diod} -f -r 0 -w 1 -n -S -U root -L stderr -e {dirs['diod']}")
    listing = uvm("share", "list").stdout
    if listing.count("mounted") < 1 + len({"ours", "relay", "diod"} & set(chosen)):
        sys.exit(f"bench-9p: shares not mounted:\n{listing}")
    guest(f"mkdir -p /mnt/virtio /dev/shm/tmpfs && mount -t 9p -o trans=virtio,version=9p2000.L,"
          f"msize={MSIZE},cache=mmap,access=client bench9p /mnt/virtio && "
          f"cp /mnt/host/tools/fsbench /mnt/host/tools/doc.tar /mnt/host/tools/tree.tar /dev/shm/")
    # /proc/mounts names the cache mode alone (",meta,"); none at all is cache=none.
    caches = " ".join(f"{f[1].rsplit('/', 1)[-1]}={next((o for o in f[3].split(',') if o in ('mmap', 'meta', 'loose', 'fscache')), 'none')}"
                      for f in (l.split() for l in guest("cat /proc/mounts").splitlines()) if len(f) > 3 and f[2] == "9p")
    log(f"cache modes: {caches}")

    def requests(share):
        for s in json.loads(uvm("share", "list", "--format", "json").stdout):
            if s["share"]["name"] == share:
                return s.get("requests") or {}
        return {}
    targets = {"ours": "/mnt/host/ours", "relay": "/mnt/host/relay", "diod": "/mnt/host/diod", "virtio": "/mnt/virtio",
               "tmpfs": "/dev/shm/tmpfs", "host": dirs["host"]}
    fs_type = (subprocess.run(["df", "--output=fstype", work], capture_output=True, text=True).stdout.split() or ["", "?"])[-1]

    def on(target, script):
        """Runs script in the guest, or natively on the host for target host (the same fsbench,
        built static, and the same tars, from the tools folder)."""
        if target != "host":
            return guest(script)
        for f in ("fsbench", "tree.tar", "doc.tar"):
            script = script.replace(f"/dev/shm/{f}", os.path.join(tools, f))
        return run(["sh", "-c", script], stdin=subprocess.DEVNULL, cwd="/").stdout
    targets = {t: p for t, p in targets.items() if t in chosen}

    # Operation by operation, each on every target in turn, so that a change in the host's load
    # (a shared machine) falls on all targets alike rather than on whichever ran then.
    results = {t: {} for t in targets}
    rpcs = {}
    for op, n in (("rtt", a.rtts), ("write", a.mib), ("read", a.mib), ("files", a.files), ("list", a.entries), ("untar", 0),
                  ("tree", 0)):
        if op not in ops:
            continue
        for target, path in targets.items():
            if op == "tree":
                before = requests(target) if target in ("ours", "relay") else None
                out = on(target, f"cd {path} && read t0 _ < /proc/uptime && tar -xf /dev/shm/tree.tar && read t1 _ < /proc/uptime && "
                                 f"echo $t0 $t1")
                t0, t1 = out.split()
                results[target]["tree_untar_s"] = float(t1) - float(t0)
                if before is not None:
                    after = requests(target)
                    rpcs[target] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
                results[target].update(json.loads(on(target, f"/dev/shm/fsbench {path} stattree tree")))
                on(target, f"rm -rf {path}/tree")
            elif op == "untar":
                out = on(target, f"cd {path} && read t0 _ < /proc/uptime && tar -xf /dev/shm/doc.tar && read t1 _ < /proc/uptime && "
                                 f"echo $t0 $t1 && find Documentation | wc -l && rm -rf Documentation")
                t0, t1, count = out.split()
                results[target]["untar_s"] = float(t1) - float(t0)
                results[target]["untar_entries"] = int(count)
            else:
                results[target].update(json.loads(on(target, f"/dev/shm/fsbench {path} {op} {n}")))
                if op in ("read", "list"):
                    on(target, f"rm -rf {path}/seq {path}/files {path}/dir")
            log(f"{op} on {target}: {results[target]}")

    st = json.loads(uvm("status", "--format", "json").stdout)
    uvm("stop")
    pid = st.get("daemonPID")
    if pid:
        try:
            os.kill(pid, 15)
        except OSError:
            pass
    shutil.rmtree(work, ignore_errors=True)

    untar_entries = next((r["untar_entries"] for r in results.values() if "untar_entries" in r), 0)
    tree_entries = next((r["stattree_entries"] for r in results.values() if "stattree_entries" in r), 0)
    rows = [
        ("one waited request (fchmod), in us", "rtt_us", None, "rtt"),
        (f"sequential write {a.mib} MiB (+fsync)", "write_s", a.mib, "write"),
        (f"sequential read {a.mib} MiB", "read_s", a.mib, "read"),
        (f"create+stat+unlink {a.files} files", "files_s", None, "files"),
        (f"list {a.entries} entries (readdir)", "list_s", None, "list"),
        (f"list {a.entries} entries + stat each", "list_stat_s", None, "list"),
        (f"untar kernel docs ({untar_entries} entries)", "untar_s", None, "untar"),
        (f"untar kernel source ({tree_entries} entries)", "tree_untar_s", None, "tree"),
        ("lstat every entry of it, first pass", "stattree1_s", None, "tree"),
        ("lstat every entry of it, second pass", "stattree2_s", None, "tree"),
    ]
    rows = [r[:3] for r in rows if r[3] in ops]
    columns = ("ours", "relay", "diod", "virtio", "tmpfs", "host")
    head = (f"{'operation':<40} {'ours':>9} {'relay':>9} {'diod':>9} {'virtio-9p':>9} {'tmpfs':>9} {'host':>9}   "
            f"{'virtio/ours':>11} {'diod/ours':>9} {'relay/ours':>10} {'ours/tmpfs':>10} {'ours/host':>9}")

    def ratio(v, other):
        """other/ours: > 1, ours is faster."""
        if v.get("ours") is None or v.get(other) is None:
            return None
        return v[other] / v["ours"] if v["ours"] > 0 else float("inf")

    def over(v, other):
        """ours/other: how many times other is faster."""
        if v.get("ours") is None or v.get(other) is None:
            return None
        return v["ours"] / v[other] if v[other] > 0 else float("inf")

    def cell(x, width, digits):
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"
    lines = [f"accelerator: {st.get('accelerator', '?')}, times in seconds in the guest (lower is better; the first row in us);",
             "ours: our server over the shared-memory transport; relay: the same server over virtio-serial",
             "and the guest relay; diod: behind the same shared-memory transport as ours; host: natively on the host.",
             "ratios are other/ours (> 1: ours is faster); ours/tmpfs is how many times the guest's own tmpfs is faster,",
             "ours/host how many times the host's own file system is.",
             f"cache modes: {caches}; shared folders on the host: {fs_type} ({work})", "", head]
    summary = {}
    for label, key, mib in rows:
        v = {t: results[t][key] for t in targets}
        r_virtio, r_diod, r_relay = ratio(v, "virtio"), ratio(v, "diod"), ratio(v, "relay")
        summary[key] = {"seconds": v, "virtio_over_ours": r_virtio, "diod_over_ours": r_diod, "relay_over_ours": r_relay}
        if mib:
            summary[key]["mib_per_s"] = {t: mib / v[t] for t in targets if v[t] > 0}
        r_tmpfs, r_host = over(v, "tmpfs"), over(v, "host")
        summary[key]["ours_over_tmpfs"] = r_tmpfs
        summary[key]["ours_over_host"] = r_host
        lines.append(f"{label:<40} " + " ".join(cell(v.get(t), 9, 3) for t in columns)
                     + f"   {cell(r_virtio, 11, 2)} {cell(r_diod, 9, 2)} {cell(r_relay, 10, 2)} {cell(r_tmpfs, 10, 1)} {cell(r_host, 9, 1)}")
    if rpcs:
        entries = tree_entries or 1
        lines.append("")
        lines.append(f"9P requests per unpacked kernel-source entry ({entries} entries), counted by our server:")
        for t in ("relay", "ours"):
            if t not in rpcs:
                continue
            r = rpcs[t]
            total = sum(r.values())
            detail = ", ".join(f"{k} {n / entries:.2f}" for k, n in sorted(r.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {t:<6} {'(cache=mmap)' if t == 'relay' else '(cache=meta)'} {total / entries:.2f}: {detail}")
        summary["tree_rpcs_per_entry"] = {t: {k: n / entries for k, n in r.items()} for t, r in rpcs.items()}
    table = "\n".join(lines)
    with open(os.path.join(a.out, "9p.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "9p.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, "host_fs": fs_type,
                   "accelerator": st.get("accelerator"), "msize": MSIZE, "results": results, "summary": summary}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
