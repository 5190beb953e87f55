#!/usr/bin/env python3
"""Memory given back to the host (make bench), side by side in one run:

  reclaim  A build-like workload in the guest (extract a ~400 MB tarball of many files from a
           share onto the distro's disk, then read every file), then idle. QEMU's RSS on the host
           is sampled from the end of the workload, with [vm] autoMemoryReclaim = disabled,
           dropCache and gradual (autoMemoryReclaimDelay = DELAY s for all three). Reported: the
           peak, the time until half of what the workload added is back with the host (WSL's own
           figure for a kernel build, after their July 2026 change: 177 s), the level at the end,
           and the time to read the files again afterwards (reclaim must not make warm work slow:
           `disabled` keeps them cached, the others read them from the disk again).
  report   Free page reporting alone: a guest process touches 1 GiB and exits; the time until
           QEMU's RSS is back within 64 MiB of where it was, with uvm's pace (kernel patch 0002:
           a pass 250 ms after a free, whole free lists) against the kernel's own (2 s, 1/16).

Results go to bench-results/memory.*.
"""
import json, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import stop_everything, uvm, write_results  # noqa: E402

DELAY = 10
SAMPLE = 0.25


def qemu_pid(home):
    return json.loads(uvm(home, "status", "--format", "json").stdout)["qemuPID"]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def settings(**kw):
    for k, v in kw.items():
        os.environ[k] = v


def make_tarball(dir):
    """~400 MB of real files (the host's /usr/lib, cut off at the size), as a build tree is."""
    path = os.path.join(dir, "tree.tar")
    files, total = [], 0
    for d, _, fs in os.walk("/usr/lib"):
        for f in sorted(fs):
            p = os.path.join(d, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            files.append(p)
            total += os.path.getsize(p)
            if total > 400 << 20:
                break
        if total > 400 << 20:
            break
    with open(os.path.join(dir, "list"), "w") as f:
        f.write("\n".join(files) + "\n")
    subprocess.run(["tar", "-cf", path, "-T", os.path.join(dir, "list")], check=True, stderr=subprocess.DEVNULL)
    return path, len(files), os.path.getsize(path)


def reclaim_run(mode, share):
    home = tempfile.mkdtemp(prefix=f"uvm-bench-mem-{mode}-")
    settings(UVM_AUTO_MEMORY_RECLAIM=mode, UVM_AUTO_MEMORY_RECLAIM_DELAY=f"{DELAY}s", UVM_MEMORY_MB="2048",
             UVM_VM_IDLE_TIMEOUT="never", UVM_INSTANCE_IDLE_TIMEOUT="never", UVM_HOME_SHARE=share)
    try:
        uvm(home, "exec", "--", "true")
        uvm(home, "manage", "busybox", "--resize", "3G")
        uvm(home, "exec", "--", "true")
        pid = qemu_pid(home)
        time.sleep(2)
        base = rss_mib(pid)
        t = time.perf_counter()
        uvm(home, "exec", "--", "sh", "-c",
            "mkdir -p /root/tree && tar -xf /mnt/host/home/tree.tar -C /root/tree && find /root/tree -type f -exec cat {} + >/dev/null")
        work_s = time.perf_counter() - t
        end = time.perf_counter()
        samples, peak = [], rss_mib(pid)
        while time.perf_counter() - end < DELAY + 40:
            v = rss_mib(pid)
            peak = max(peak, v)
            samples.append((round(time.perf_counter() - end, 2), v))
            time.sleep(SAMPLE)
        half = base + (peak - base) / 2
        t_half = next((s for s, v in samples if v <= half), None)
        final = samples[-1][1]
        t = time.perf_counter()
        uvm(home, "exec", "--", "sh", "-c", "find /root/tree -type f -exec cat {} + >/dev/null")
        reread_s = time.perf_counter() - t
        return {"base_mib": base, "peak_mib": peak, "final_mib": final, "workload_s": round(work_s, 1),
                "half_back_s": t_half, "reread_s": round(reread_s, 2), "samples": samples}
    finally:
        stop_everything(home)
        shutil.rmtree(home, ignore_errors=True)


def report_run(pace):
    home = tempfile.mkdtemp(prefix="uvm-bench-report-")
    settings(UVM_AUTO_MEMORY_RECLAIM="disabled", UVM_MEMORY_MB="2048", UVM_VM_IDLE_TIMEOUT="never",
             UVM_INSTANCE_IDLE_TIMEOUT="never", UVM_PAGE_REPORTING=pace)
    try:
        uvm(home, "exec", "--", "true")
        pid = qemu_pid(home)
        time.sleep(3)
        base = rss_mib(pid)
        uvm(home, "exec", "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=1024M", "count=1")
        end, peak, back = time.perf_counter(), rss_mib(pid), None
        while time.perf_counter() - end < 40:
            v = rss_mib(pid)
            if v <= base + 64:
                back = round(time.perf_counter() - end, 2)
                break
            time.sleep(0.1)
        return {"base_mib": base, "after_exit_mib": peak, "back_s": back}
    finally:
        stop_everything(home)
        shutil.rmtree(home, ignore_errors=True)
        os.environ.pop("UVM_PAGE_REPORTING", None)


def main(out="bench-results"):
    os.makedirs(out, exist_ok=True)
    share = tempfile.mkdtemp(prefix="uvm-bench-mem-share-")
    res = {"delay_s": DELAY}
    rows = []
    try:
        _, nfiles, size = make_tarball(share)
        res["tarball"] = {"files": nfiles, "bytes": size}
        print(f"bench: memory: workload tarball {nfiles} files, {size >> 20} MiB", file=sys.stderr)
        for mode in ["disabled", "dropCache", "gradual"]:
            r = reclaim_run(mode, share)
            res[mode] = r
            added = r["peak_mib"] - r["base_mib"]
            half = f"{r['half_back_s']:.1f} s" if r["half_back_s"] is not None else "never"
            rows.append((f"reclaim {mode}: peak / half back / end", f"{r['peak_mib']} MiB",
                         f"base {r['base_mib']} MiB, +{added} MiB; half back after {half} (delay {DELAY} s); "
                         f"{r['final_mib']} MiB after {DELAY + 40} s; re-read {r['reread_s']} s"))
        for pace in ["uvm", "upstream"]:
            r = report_run("" if pace == "uvm" else "upstream")
            res[f"report_{pace}"] = r
            back = f"{r['back_s']} s" if r["back_s"] is not None else "not within 40 s"
            rows.append((f"page reporting, {pace} pace: freed 1 GiB back", back,
                         f"base {r['base_mib']} MiB, {r['after_exit_mib']} MiB when the process exited"))
        u, k = res["report_uvm"]["back_s"], res["report_upstream"]["back_s"]
        if u and k:
            rows.append(("page reporting: kernel's pace / uvm's", f"{k / max(u, 0.01):.1f}x", "time to give a freed GiB back"))
    finally:
        shutil.rmtree(share, ignore_errors=True)
    write_results(out, "memory", res, rows, 10)


if __name__ == "__main__":
    main(*sys.argv[1:])
