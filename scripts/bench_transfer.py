#!/usr/bin/env python3
"""Moving files across the VM boundary: `uvm cp` against the other ways a user has, in one run.

On one VM (the default busybox distro), alternately, 3 rounds each (medians):
  in   a 256 MiB file from the host into the distro (its /dev/shm: the busybox disk is too small):
         uvm cp FILE :/dev/shm/x
         uvm exec -- sh -c 'cat > /dev/shm/x' < FILE          (exec's stdin)
         uvm exec -- cp /mnt/host/bench/FILE /dev/shm/x       (through a share: our 9P server)
  out  the same file back to the host:
         uvm cp :/dev/shm/x DIR/
         uvm exec -- cat /dev/shm/x > FILE                    (exec's stdout)
         uvm exec -- cp /dev/shm/x /mnt/host/bench/           (through the share)
  tree 2,000 files of 4 KiB in 20 folders, in and out: uvm cp -r against tar over exec's stdio.
and, for the limit, the same 256 MiB copied inside the guest (cp /dev/shm/x /dev/shm/y, timed there).
Times are wall-clock seconds on the host; ratios are the alternative's time / uvm cp's (> 1: uvm cp
is faster). Results: bench-results/transfer.{txt,json}.
"""
import json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("UVM_BIN", os.path.join(ROOT, ".build/release"))
UVM = os.path.join(BIN, "uvm")
ROUNDS = 3
BIG_MIB = 256


def log(msg):
    print(f"bench-transfer: {msg}", file=sys.stderr, flush=True)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "bench-results"
    os.makedirs(out_dir, exist_ok=True)
    home = tempfile.mkdtemp(prefix="uvm-bench-transfer-")
    work = tempfile.mkdtemp(prefix="uvm-bench-transfer-files-")
    env = dict(os.environ, UVM_HOME=home, UVMD_PATH=os.path.join(BIN, "uvmd"), XDG_CONFIG_HOME=os.path.join(home, "config"))
    env.pop("UVM_CONFIG", None)

    def uvm(*args, stdin=None, stdout=subprocess.PIPE):
        r = subprocess.run([UVM, *args], env=env, stdin=stdin or subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE)
        if r.returncode != 0:
            sys.exit(f"bench-transfer: uvm {' '.join(args)} failed ({r.returncode}): {r.stderr.decode()[-800:]}")
        return r

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    try:
        shared = os.path.join(work, "shared")
        os.makedirs(shared)
        big = os.path.join(shared, "big")
        with open(big, "wb") as f:
            for _ in range(BIG_MIB):
                f.write(os.urandom(1 << 20))
        tree = os.path.join(work, "tree")
        for d in range(20):
            os.makedirs(os.path.join(tree, f"d{d}"))
            for i in range(100):
                with open(os.path.join(tree, f"d{d}", f"f{i}"), "wb") as f:
                    f.write(os.urandom(4096))
        back = os.path.join(work, "back")
        uvm("share", "add", "bench", shared)
        uvm("exec", "--", "true")
        log(f"VM up; {ROUNDS} rounds")

        def reset_back():
            shutil.rmtree(back, ignore_errors=True)
            os.makedirs(back)

        t = {k: [] for k in ["in_cp", "in_exec", "in_share", "out_cp", "out_exec", "out_share",
                             "tree_in_cp", "tree_in_tar", "tree_out_cp", "tree_out_tar", "guest_cp"]}
        for r in range(ROUNDS):
            uvm("exec", "--", "rm", "-f", "/dev/shm/x")
            t["in_cp"].append(timed(lambda: uvm("cp", big, ":/dev/shm/x")))
            uvm("exec", "--", "rm", "-f", "/dev/shm/x")
            with open(big, "rb") as f:
                t["in_exec"].append(timed(lambda: uvm("exec", "--", "sh", "-c", "cat > /dev/shm/x", stdin=f)))
            uvm("exec", "--", "rm", "-f", "/dev/shm/x")
            t["in_share"].append(timed(lambda: uvm("exec", "--", "cp", "/mnt/host/bench/big", "/dev/shm/x")))

            reset_back()
            t["out_cp"].append(timed(lambda: uvm("cp", ":/dev/shm/x", back + "/")))
            reset_back()
            with open(os.path.join(back, "x"), "wb") as f:
                t["out_exec"].append(timed(lambda: uvm("exec", "--", "cat", "/dev/shm/x", stdout=f)))
            t["out_share"].append(timed(lambda: uvm("exec", "--", "cp", "/dev/shm/x", "/mnt/host/bench/x")))
            os.unlink(os.path.join(shared, "x"))
            # The limit: the same bytes copied inside the guest, timed there.
            a, b = map(float, uvm("exec", "--", "sh", "-c",
                                  "read a _ < /proc/uptime; cp /dev/shm/x /dev/shm/y; read b _ < /proc/uptime; rm /dev/shm/y; echo $a $b"
                                  ).stdout.split())
            t["guest_cp"].append(b - a)

            uvm("exec", "--", "rm", "-rf", "/dev/shm/tree")
            t["tree_in_cp"].append(timed(lambda: uvm("cp", "-r", tree, ":/dev/shm/")))
            uvm("exec", "--", "rm", "-rf", "/dev/shm/tree")
            tar = subprocess.Popen(["tar", "-C", work, "-c", "tree"], stdout=subprocess.PIPE)
            t["tree_in_tar"].append(timed(lambda: uvm("exec", "--", "tar", "-C", "/dev/shm", "-x", stdin=tar.stdout)))
            tar.wait()
            reset_back()
            t["tree_out_cp"].append(timed(lambda: uvm("cp", "-r", ":/dev/shm/tree", back + "/")))
            reset_back()

            def out_tar():
                p = subprocess.Popen(["tar", "-C", back, "-x"], stdin=subprocess.PIPE)
                uvm("exec", "--", "tar", "-C", "/dev/shm", "-c", "tree", stdout=p.stdin)
                p.stdin.close()
                p.wait()
            t["tree_out_tar"].append(timed(out_tar))
            log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in t.items()))

        m = {k: statistics.median(v) for k, v in t.items()}
        mibs = lambda s: BIG_MIB / s
        res = {"rounds": ROUNDS, "big_mib": BIG_MIB, "seconds": t, "median_s": m,
               "when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename}
        rows = [
            (f"in: uvm cp {BIG_MIB} MiB", f"{m['in_cp']:.2f} s", f"{mibs(m['in_cp']):.0f} MiB/s"),
            ("in: uvm exec stdin (cat >)", f"{m['in_exec']:.2f} s", f"ratio {m['in_exec'] / m['in_cp']:.2f}"),
            ("in: cp from a share (9P)", f"{m['in_share']:.2f} s", f"ratio {m['in_share'] / m['in_cp']:.2f}"),
            (f"out: uvm cp {BIG_MIB} MiB", f"{m['out_cp']:.2f} s", f"{mibs(m['out_cp']):.0f} MiB/s"),
            ("out: uvm exec stdout (cat)", f"{m['out_exec']:.2f} s", f"ratio {m['out_exec'] / m['out_cp']:.2f}"),
            ("out: cp to a share (9P)", f"{m['out_share']:.2f} s", f"ratio {m['out_share'] / m['out_cp']:.2f}"),
            ("limit: cp inside the guest", f"{m['guest_cp']:.2f} s", f"{mibs(m['guest_cp']):.0f} MiB/s"),
            ("tree in: uvm cp -r (2,000 x 4 KiB)", f"{m['tree_in_cp']:.2f} s", ""),
            ("tree in: tar | uvm exec tar -x", f"{m['tree_in_tar']:.2f} s", f"ratio {m['tree_in_tar'] / m['tree_in_cp']:.2f}"),
            ("tree out: uvm cp -r", f"{m['tree_out_cp']:.2f} s", ""),
            ("tree out: uvm exec tar -c | tar -x", f"{m['tree_out_tar']:.2f} s", f"ratio {m['tree_out_tar'] / m['tree_out_cp']:.2f}"),
        ]
        width = max(len(r[0]) for r in rows)
        table = "\n".join(f"{r[0]:<{width}}  {r[1]:>9}  {r[2]}" for r in rows)
        with open(os.path.join(out_dir, "transfer.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(out_dir, "transfer.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
    finally:
        subprocess.run([UVM, "stop"], env=env, capture_output=True)
        pidfile = os.path.join(home, "state", "uvmd.lock")
        try:
            os.kill(int(open(pidfile).read().strip()), 15)
        except (OSError, ValueError):
            pass
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
