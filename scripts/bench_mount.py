#!/usr/bin/env python3
"""`uvm mount` benchmark: a distribution's files read and written from the host through the FUSE
mount (FUSE -> uvm's 9P client -> uvmd -> the guest agent's 9P server), next to the same work
done inside the guest (the limit).

On the busybox distro, one VM: sequential write (+fsync) and read of a 256 MiB file in the
guest's /dev/shm (tmpfs: the distro disk is too small for it, and it keeps the guest's disk out
of the figures), and `find` over /usr. Host-side times are wall-clock on the host; guest-side
ones from the guest's uptime. `uvm cp` (issue 17 part 1) is not measured here yet.
Results: bench-results/mount.{txt,json}.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("UVM_BIN", os.path.join(ROOT, ".build/release"))
UVM = os.path.join(BIN, "uvm")


def log(msg):
    print(f"bench-mount: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench-mount: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--distro", default="busybox")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) or not shutil.which("fusermount3"):
        sys.exit("bench-mount: needs /dev/fuse read-write and fusermount3 (make setup)")

    work = tempfile.mkdtemp(prefix="uvm-bench-mount-")
    home, mnt = os.path.join(work, "uvm"), os.path.join(work, "mnt")
    os.makedirs(mnt)
    env = dict(os.environ, UVM_HOME=home, UVMD_PATH=os.path.join(BIN, "uvmd"), UVM_HOME_SHARE="off",
               UVM_INSTANCE_IDLE_TIMEOUT="never", UVM_VM_IDLE_TIMEOUT="never")

    def uvm(*args, **kw):
        return run([UVM, *args], env=env, stdin=subprocess.DEVNULL, cwd="/", **kw)

    def guest_seconds(script):
        out = uvm("exec", "--distro", a.distro, "--user", "root", "--", "sh", "-c",
                  f"read t0 _ < /proc/uptime; {script}; read t1 _ < /proc/uptime; echo $t0 $t1").stdout.split()
        return float(out[-1]) - float(out[-2]), out[:-2]

    def host_seconds(cmd):
        t0 = time.monotonic()
        r = run(["sh", "-c", cmd])
        return time.monotonic() - t0, r.stdout.split()

    results = {"mount": {}, "guest": {}}
    try:
        uvm("start")
        uvm("mount", a.distro, mnt, "--user", "root")
        n = a.mib
        for _ in range(1):
            t, _ = host_seconds(f"dd if=/dev/zero of={mnt}/dev/shm/host-big bs=1M count={n} conv=fsync 2>/dev/null")
            results["mount"]["write_s"] = t
            log(f"write {n} MiB through the mount: {t:.2f} s")
            t, _ = guest_seconds(f"dd if=/dev/zero of=/dev/shm/guest-big bs=1M count={n} conv=fsync 2>/dev/null")
            results["guest"]["write_s"] = t
            log(f"write {n} MiB in the guest: {t:.2f} s")
            t, _ = host_seconds(f"cat {mnt}/dev/shm/guest-big > /dev/null")
            results["mount"]["read_s"] = t
            log(f"read {n} MiB through the mount: {t:.2f} s")
            t, _ = guest_seconds("cat /dev/shm/host-big > /dev/null")
            results["guest"]["read_s"] = t
            log(f"read {n} MiB in the guest: {t:.2f} s")
            t, out = host_seconds(f"find {mnt}/usr | wc -l")
            results["mount"]["find_s"], results["mount"]["find_entries"] = t, int(out[-1])
            t, out = guest_seconds("find /usr | wc -l")
            results["guest"]["find_s"], results["guest"]["find_entries"] = t, int(out[-1])
            log(f"find /usr: mount {results['mount']['find_s']:.2f} s, guest {t:.2f} s ({results['guest']['find_entries']} entries)")
        uvm("exec", "--distro", a.distro, "--user", "root", "--", "rm", "-f", "/dev/shm/host-big", "/dev/shm/guest-big")
    finally:
        subprocess.run([UVM, "unmount", mnt], env=env, capture_output=True)
        st = json.loads(subprocess.run([UVM, "status", "--format", "json"], env=env, capture_output=True, text=True).stdout or "{}")
        subprocess.run([UVM, "stop"], env=env, capture_output=True)
        if st.get("daemonPID"):
            try:
                os.kill(st["daemonPID"], 15)
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)

    m, g = results["mount"], results["guest"]
    rows = [(f"sequential write {a.mib} MiB (+fsync)", "write_s", a.mib), (f"sequential read {a.mib} MiB", "read_s", a.mib),
            (f"find /usr ({g['find_entries']} entries)", "find_s", None)]
    lines = [f"accelerator: {st.get('accelerator', '?')}; seconds (lower is better): through `uvm mount` on the host, and inside the guest",
             "", f"{'operation':<40} {'mount':>9} {'guest':>9} {'mount/guest':>12} {'mount MiB/s':>12}"]
    for label, key, mib in rows:
        ratio = m[key] / g[key] if g[key] > 0 else float("inf")
        rate = f"{mib / m[key]:>12.1f}" if mib else f"{'':>12}"
        lines.append(f"{label:<40} {m[key]:>9.3f} {g[key]:>9.3f} {ratio:>12.1f} {rate}")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "mount.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "mount.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename,
                   "accelerator": st.get("accelerator"), "results": results}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
