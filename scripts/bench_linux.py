#!/usr/bin/env python3
"""Full Linux inside (make bench), side by side in one run:

  kernel   The kernel's size and its build from scratch (a build-seconds file next to it, when present),
           and cold `uvm exec -- true` with it, next to bare QEMU booting the same kernel and
           initramfs, and next to the previous kernel when one is given (UVM_BENCH_OLD_KERNEL=path
           to its bzImage, e.g. an earlier ~/.cache/uvm/kernel/KEY/bzImage). The guest's time to
           /init (its printk timestamp of "Run /init") for each.
  systemd  With the debian-docker distribution installed (`uvm install debian-docker`; skipped,
           saying so, when that fails): an instance start with systemd as its init next to one without (uvm's own init), as
           the time until `uvm exec` runs and until systemd reports `running`; and `docker run --rm
           IMAGE true` (median of 5).

Results go to bench-results/linux.*.
"""
import json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import INITRD, KERNEL, bare_qemu, stop_everything, timed, uvm, write_results  # noqa: E402
import bench  # noqa: E402

RUNS = 3


def init_seconds(home):
    """The guest's uptime when the kernel ran /init, from its log."""
    out = uvm(home, "exec", "--", "dmesg").stdout
    for line in out.splitlines():
        if "Run /init as init process" in line:
            return float(line.split("]")[0].strip("[ "))
    return None


def cold(home, kernel):
    os.environ["UVM_KERNEL"] = kernel
    runs, init = [], []
    for _ in range(RUNS):
        stop_everything(home)
        runs.append(timed(lambda: uvm(home, "exec", "--", "true")))
        init.append(init_seconds(home))
    stop_everything(home)
    return {"cold_exec_s": statistics.median(runs), "runs": runs,
            "init_s": statistics.median([i for i in init if i is not None] or [0])}


def bare(kernel, st):
    bench.KERNEL = kernel
    return statistics.median([timed(lambda: bare_qemu(st.get("memoryMiB", 2048), min(os.cpu_count() or 1, 8),
                                                      st.get("accelerator", "tcg"))) for _ in range(RUNS)])


def systemd_runs(home):
    d = "debian-docker"
    if d not in uvm(home, "list").stdout and uvm(home, "install", d, check=False).returncode != 0:
        return None
    res = {}
    for systemd in ["false", "true"]:
        uvm(home, "exec", "--distro", d, "--user", "root", "--", "sed", "-i", f"s/^systemd = .*/systemd = {systemd}/", "/etc/uvm.conf")
        execs, ready = [], []
        for _ in range(RUNS):
            uvm(home, "terminate", d)
            t = time.perf_counter()
            uvm(home, "exec", "--distro", d, "--", "true")
            execs.append(time.perf_counter() - t)
            if systemd == "true":
                uvm(home, "exec", "--distro", d, "--", "timeout", "300", "systemctl", "is-system-running", "--wait", check=False)
                ready.append(time.perf_counter() - t)
        res[systemd] = {"exec_s": statistics.median(execs), "running_s": statistics.median(ready) if ready else None}
    img = subprocess.run(["tar", "-C", "/", "-cf", "-", "bin/busybox"], capture_output=True).stdout
    r = subprocess.run([bench.UVM, "exec", "--distro", d, "--", "sh", "-c", "docker import - bbbench:1 >/dev/null"],
                       input=img, env=bench.env(home), capture_output=True)
    if r.returncode != 0:
        res["docker_run_s"] = None
        return res
    runs = [timed(lambda: uvm(home, "exec", "--distro", d, "--", "docker", "run", "--rm", "bbbench:1", "/bin/busybox", "true"))
            for _ in range(5)]
    res["docker_run_s"] = statistics.median(runs)
    return res


def main(out="bench-results"):
    os.makedirs(out, exist_ok=True)
    home = os.environ.get("UVM_BENCH_HOME") or tempfile.mkdtemp(prefix="uvm-bench-linux-")
    res, rows = {}, []
    kdir = os.path.dirname(KERNEL)
    res["bzImage_bytes"] = os.path.getsize(KERNEL)
    try:
        with open(os.path.join(kdir, "build-seconds")) as f:
            res["kernel_build_s"] = int(f.read().strip())
    except OSError:
        res["kernel_build_s"] = None
    uvm(home, "exec", "--", "true")
    st = json.loads(uvm(home, "status", "--format", "json").stdout)
    new = cold(home, KERNEL)
    new["bare_qemu_s"] = bare(KERNEL, st)
    res["new"] = new
    rows.append(("bzImage", f"{res['bzImage_bytes'] >> 10} KiB",
                 f"built from scratch in {res['kernel_build_s']} s on {os.cpu_count()} cores" if res["kernel_build_s"] else "build time not recorded"))
    rows.append(("cold uvm exec -- true (this kernel)", f"{new['cold_exec_s']:.2f} s",
                 f"bare QEMU {new['bare_qemu_s']:.2f} s: {new['cold_exec_s'] / new['bare_qemu_s']:.2f}x (goal <= 1.15); guest reached /init at {new['init_s']:.2f} s"))
    old_kernel = os.environ.get("UVM_BENCH_OLD_KERNEL")
    if old_kernel and os.path.exists(old_kernel):
        old = cold(home, old_kernel)
        res["old"] = old
        res["old_bzImage_bytes"] = os.path.getsize(old_kernel)
        rows.append(("cold uvm exec -- true (previous kernel)", f"{old['cold_exec_s']:.2f} s",
                     f"{res['old_bzImage_bytes'] >> 10} KiB bzImage; /init at {old['init_s']:.2f} s; this kernel's /init time "
                     f"{new['init_s'] / max(old['init_s'], 0.01):.2f}x (goal <= 1.2)"))
    else:
        rows.append(("cold uvm exec -- true (previous kernel)", "-", "not measured: set UVM_BENCH_OLD_KERNEL to an earlier bzImage"))
    os.environ["UVM_KERNEL"] = KERNEL
    sd = systemd_runs(home)
    res["systemd"] = sd
    if sd is None:
        rows.append(("instance start, systemd", "-", "not measured: `uvm install debian-docker` failed (is the Debian mirror reachable?)"))
    else:
        rows.append(("instance start without systemd: exec", f"{sd['false']['exec_s']:.2f} s", "uvm's own init"))
        rows.append(("instance start with systemd: exec / running", f"{sd['true']['exec_s']:.2f} s",
                     f"systemd reports running after {sd['true']['running_s']:.2f} s"))
        if sd.get("docker_run_s") is not None:
            rows.append(("docker run --rm IMAGE true", f"{sd['docker_run_s']:.2f} s", "median of 5, through uvm exec"))
    stop_everything(home)
    write_results(out, "linux", res, rows, 10)


if __name__ == "__main__":
    main(*sys.argv[1:])
