#!/usr/bin/env python3
"""uvm benchmarks. Results go to bench-results/ and a table to stdout.

Boot and exec:
  cold   `uvm exec -- true` with the VM stopped (uvmd running), against booting the same kernel
         and initramfs with bare qemu-system-x86_64 whose init powers off at once
         (uvm.poweroff=1); the two are measured alternately in one run.
  warm   `uvm exec -- true` with the VM up, p50/p99 over N runs, next to the guest's own cost of
         spawning /bin/true from a shell (measured inside the guest); then 50 `uvm exec` started
         together, 3 times: each must print its own line, and p50/p99 of their times.
  uvmd   resident memory after the runs.

Lifecycle (lifecycle_bench):
  prompt  `uvm` on a terminal with nothing running (no uvmd, no VM) until the shell has run the
          first command typed at it.
  reaper  after the last `uvm exec` returns, how long until the QEMU process is gone, next to the
          configured instanceIdleTimeout + vmIdleTimeout (the rest is the clean teardown).
  fault   QEMU killed (-9) under a running `uvm exec`: how long until that command has exited
          with its error.

Network (bench_network): a busybox httpd in the guest serves a 256 MiB file and a tiny one; the
same server is fetched through uvm's localhost forwarding and through QEMU's own user-mode
`hostfwd` (added to the same running VM with the monitor's hostfwd_add), alternately, in one run:
throughput (MB/s) and per-connection latency (connect + tiny request + response), as ratios.
"""
import argparse, json, os, pty, select, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

BIN = os.environ.get("UVM_BIN", os.path.abspath(".build/release"))
UVM = os.path.join(BIN, "uvm")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uvm")
KERNEL = os.environ.get("UVM_KERNEL") or os.path.join(CACHE, "kernel/current/bzImage")
INITRD = os.path.join(os.environ.get("UVM_IMAGES") or os.path.join(CACHE, "images/current"), "initramfs.cpio")


def env(home, config=None):
    e = dict(os.environ)
    e["UVM_HOME"] = home
    e["UVMD_PATH"] = os.path.join(BIN, "uvmd")
    # The user's own uvm.conf must not change the numbers.
    e["XDG_CONFIG_HOME"] = os.path.join(home, "config")
    e.pop("UVM_CONFIG", None)
    if config:
        e["UVM_CONFIG"] = config
    return e


def uvm(home, *args, check=True, config=None):
    r = subprocess.run([UVM, *args], env=env(home, config), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"bench: uvm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def write_results(out, name, res, rows, value_width):
    """res as out/NAME.json; rows (label, value, remark) as an aligned table in out/NAME.txt and on stdout."""
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"{r[0]:<{width}}  {r[1]:>{value_width}}  {r[2]}" for r in rows)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write(table + "\n")
    print(table)


def boot_image(kernel):
    """What uvm boots for this kernel (Paths.bootImage): the vmlinux beside a bzImage, if any."""
    vmlinux = os.path.join(os.path.dirname(kernel), "vmlinux")
    return vmlinux if os.path.basename(kernel) == "bzImage" and os.path.exists(vmlinux) else kernel


HOP_NOTES = {
    "cli.startup+exit": "uvm process start to main(), and its exit (wall time minus the rest)",
    "cli.connect": "CLI: main() to connected to uvmd",
    "uvmd.beforeGuest": "uvmd: request read to the guest session opened",
    "uvmd.link": "virtio-serial both ways, HTTP/2 in both event loops",
    "guest.dispatch": "agent: request off its stream to its task running",
    "guest.beforeSpawn": "agent: request to process spawned",
    "guest.process": "agent: spawned to exit seen (the command)",
    "guest.afterExit": "agent: exit seen to exit frame written",
    "cli.rest": "CLI session time not accounted above (uvmd<->CLI frames)",
}


def guest_cpu(home):
    """The guest's /proc/stat cpu line: (busy, user, system) ticks of 10 ms, summed over its vCPUs."""
    f = list(map(int, uvm(home, "exec", "--", "head", "-1", "/proc/stat").stdout.split()[1:8]))
    return sum(f) - f[3] - f[4], f[0] + f[1], f[2]


def guest_cpu_per(home, n, body):
    """Guest CPU milliseconds (busy, user, system) per each of the `n` things `body` does: the
    work the guest did, without the waits a latency has (a busy host stretches it too: a
    preempted vCPU's clock runs on; compare within one run).
    One `uvm exec` (the second reading) is counted in, ~1/n of an exec each."""
    a = guest_cpu(home)
    body()
    b = guest_cpu(home)
    return tuple((y - x) * 10 / n for x, y in zip(a, b))


def warm_hops(home, runs):
    """Median per hop of warm `uvm exec -- true` (UVM_TRACE=1: each side times its own part)."""
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run([UVM, "exec", "--", "true"], env={**env(home), "UVM_TRACE": "1"},
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        wall = time.perf_counter() - t
        line = next((l for l in r.stderr.splitlines() if l.startswith("uvm-trace: ")), None)
        if r.returncode != 0 or line is None:
            sys.exit(f"bench: traced exec failed ({r.returncode}): {r.stderr.strip()}")
        h = json.loads(line[len("uvm-trace: "):])
        inner = sum(h.get(k, 0) for k in ["uvmd.beforeGuest", "uvmd.link", "guest.dispatch", "guest.beforeSpawn", "guest.process", "guest.afterExit"])
        h["cli.rest"] = max(0.0, h["cli.session"] - inner)
        h["cli.startup+exit"] = max(0.0, wall - h["cli.connect"] - h["cli.session"])
        samples.append(h)
    return {k: statistics.median([x[k] for x in samples]) * 1000 for k in HOP_NOTES}


def concurrent_execs(home, n=50, rounds=3):
    """`n` `uvm exec` started together, each printing its own number (all must print it and exit
    0), `rounds` times: each one's wall time, and each round's."""
    import threading
    each, rounds_s, wrong = [], [], []
    for r in range(rounds):
        barrier = threading.Barrier(n)
        results = [None] * n

        def one(i):
            barrier.wait()
            t = time.perf_counter()
            p = subprocess.run([UVM, "exec", "--", "sh", "-c", f"echo {r}-{i}"], env=env(home),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
            results[i] = (time.perf_counter() - t, p.returncode, p.stdout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for th in threads: th.start()
        for th in threads: th.join()
        rounds_s.append(time.perf_counter() - t0)
        for i, (dt, rc, out) in enumerate(results):
            each.append(dt)
            if rc != 0 or out != f"{r}-{i}\n":
                wrong.append(f"round {r + 1} exec {i}: exit {rc}, printed {out!r}")
    if wrong:
        sys.exit("bench: concurrent execs went wrong: " + "; ".join(wrong[:5]))
    return each, rounds_s


PHASE_NOTES = {
    "prepare": "disks, accelerator probe, swap file, XML",
    "libvirt": "createXML: QEMU started, QMP set-up, cont",
    "firmware": "running to the kernel's clock (BIOS, kernel load)",
    "kernel": "kernel start to /init (initramfs, devices)",
    "agent": "/init to the agent's first answer",
    "setup": "swap, memory policy, shares",
    "total": "boot requested to VM ready",
}


def bare_qemu(mem, cpus, accel, firmware=None):
    # The BIOS uvm's VM started from (`uvm status`: qboot where QEMU has it), so that the two
    # boots differ only by what uvm adds.
    bios = ["-bios", firmware] if firmware and firmware != "seabios" else []
    cmd = ["qemu-system-x86_64", "-M", "q35", "-accel", accel, "-m", str(mem), "-smp", str(cpus), *bios,
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "null", "-no-reboot",
           "-kernel", boot_image(KERNEL), "-initrd", INITRD,
           # uvm's VM has a virtio-rng too: without one the guest's CRNG is ready only ~1.1 s
           # after /init under TCG, and the agent's first getrandom() (the Swift runtime's hash
           # seed) waits for it, which made the bare boot look that much slower than it is.
           "-device", "virtio-rng-pci",
           "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init apic_timer_hz=1000000000 uvm.poweroff=1"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"bench: bare qemu failed: {r.stderr.decode()[-500:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--warm-runs", type=int, default=200)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--only", choices=["boot", "network", "lifecycle"], help="run one section")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.only == "network":
        return bench_network(a.out)
    if a.only == "lifecycle":
        return lifecycle_bench(a.out)
    home = tempfile.mkdtemp(prefix="uvm-bench-")

    uvm(home, "exec", "--", "true")  # installs the distro, starts uvmd
    st = json.loads(uvm(home, "status", "--format", "json").stdout)
    accel = st.get("accelerator", "tcg")
    mem = st.get("memoryMiB", 2048)
    cpus = int(os.environ.get("UVM_CPUS", os.cpu_count() or 1))

    cold, bare, phases = [], [], []
    for i in range(a.cold_runs):
        uvm(home, "stop")
        cold.append(timed(lambda: uvm(home, "exec", "--", "true")))
        st = json.loads(uvm(home, "status", "--format", "json").stdout)
        firmware = st.get("firmware")
        if st.get("boot"):
            phases.append(st["boot"])
        # uvm's VM, idle, would still take CPU from the bare boot.
        uvm(home, "stop")
        bare.append(timed(lambda: bare_qemu(mem, min(cpus, 8), accel, firmware)))
        print(f"  cold run {i + 1}/{a.cold_runs}: uvm {cold[-1]:.2f} s, bare qemu {bare[-1]:.2f} s", file=sys.stderr)
    # Where uvm's cold start goes, median per phase (uvmd's `uvm status` boot record); what is
    # left of the CLI's time is the CLI, uvmd's request, the instance start and the exec itself.
    phase_names = ["prepare", "libvirt", "firmware", "kernel", "agent", "setup", "total"]
    boot_phases = {p: statistics.median([b[p] for b in phases if b.get(p) is not None])
                   for p in phase_names if any(b.get(p) is not None for b in phases)}

    uvm(home, "exec", "--", "true")
    warm = [timed(lambda: uvm(home, "exec", "--", "true")) for _ in range(a.warm_runs)]
    hops = warm_hops(home, max(20, a.warm_runs // 4))
    conc, conc_rounds = concurrent_execs(home)
    n = 200
    spawn_script = ("read a _ < /proc/uptime; i=0; while [ $i -lt %d ]; do /bin/true; i=$((i+1)); done; "
                    "read b _ < /proc/uptime; echo $a $b") % n
    samples = []
    for _ in range(3):
        a0, b0 = map(float, uvm(home, "exec", "--", "sh", "-c", spawn_script).stdout.split())
        samples.append((b0 - a0) / n)
    guest_spawn = statistics.median(samples)
    # The same in guest CPU: what one warm exec costs the guest, next to one spawn from sh.
    exec_cpu = guest_cpu_per(home, 50, lambda: [uvm(home, "exec", "--", "true") for _ in range(50)])
    spawn_cpu = guest_cpu_per(home, 200, lambda: uvm(
        home, "exec", "--", "sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"))
    st = json.loads(uvm(home, "status", "--format", "json").stdout)
    rss = st.get("daemonRSSKiB", 0)

    uvm(home, "stop", check=False)
    pid = st.get("daemonPID")
    if pid:
        try: os.kill(pid, 15)
        except OSError: pass

    res = {
        "accelerator": accel,
        "cold_start_s": {"median": statistics.median(cold), "runs": cold},
        "bare_qemu_boot_s": {"median": statistics.median(bare), "runs": bare},
        "cold_start_ratio": statistics.median(cold) / statistics.median(bare),
        "firmware": firmware,
        "boot_phases_s": boot_phases,
        "warm_exec_ms": {"p50": pct(warm, 50) * 1000, "p99": pct(warm, 99) * 1000, "runs": len(warm)},
        "guest_spawn_true_ms": guest_spawn * 1000,
        "warm_exec_p50_ratio_to_guest_spawn": pct(warm, 50) / guest_spawn if guest_spawn > 0 else None,
        "warm_exec_hops_ms": hops,
        "concurrent_50_exec_ms": {"p50": pct(conc, 50) * 1000, "p99": pct(conc, 99) * 1000, "max": max(conc) * 1000,
                                  "execs": len(conc), "all_correct": True,
                                  "round_wall_s": conc_rounds},
        "guest_cpu_ms_per_warm_exec": dict(zip(["busy", "user", "system"], exec_cpu)),
        "guest_cpu_ms_per_spawn_from_sh": dict(zip(["busy", "user", "system"], spawn_cpu)),
        "uvmd_rss_mib": rss / 1024,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": os.uname().nodename,
    }
    rows = [
        ("accelerator", accel.upper(), ""),
        ("cold start: uvm exec -- true, VM stopped (median)", f"{res['cold_start_s']['median']:.2f} s", f"{a.cold_runs} runs"),
        ("bare qemu-system-x86_64 boot + power-off (median)", f"{res['bare_qemu_boot_s']['median']:.2f} s", "same kernel+initramfs"),
        ("cold-start ratio (goal <= 1.15)", f"{res['cold_start_ratio']:.2f}", f"both from {firmware or 'seabios'}"),
        *[(f"  boot phase: {p}", f"{v:.2f} s", PHASE_NOTES[p]) for p, v in boot_phases.items()],
        ("  after the boot: instance start + exec + CLI", f"{statistics.median(cold) - boot_phases.get('total', 0):.2f} s", "cold start minus boot total"),
        ("warm uvm exec -- true p50", f"{res['warm_exec_ms']['p50']:.1f} ms", f"{a.warm_runs} runs"),
        ("warm uvm exec -- true p99", f"{res['warm_exec_ms']['p99']:.1f} ms", ""),
        ("guest's own spawn of /bin/true", f"{res['guest_spawn_true_ms']:.1f} ms", "from sh, in the guest"),
        ("warm p50 / guest spawn (goal <= 2)", f"{res['warm_exec_p50_ratio_to_guest_spawn']:.2f}", ""),
        *[(f"  warm exec hop: {h}", f"{v:.1f} ms", HOP_NOTES.get(h, "")) for h, v in hops.items()],
        ("50 concurrent uvm exec: p50 / p99 of each", f"{pct(conc, 50) * 1000:.0f} / {pct(conc, 99) * 1000:.0f} ms",
         f"{len(conc)} execs in {len(conc_rounds)} rounds, all printed their own line; round wall {statistics.median(conc_rounds):.2f} s"),
        ("50 concurrent: p99 / p50 (goal <= 5)", f"{pct(conc, 99) / pct(conc, 50):.2f}", ""),
        ("guest CPU per warm exec: busy (user/system)", f"{exec_cpu[0]:.1f} ms", f"{exec_cpu[1]:.1f} / {exec_cpu[2]:.1f} ms, 50 execs, both vCPUs"),
        ("guest CPU per spawn of /bin/true from sh", f"{spawn_cpu[0]:.1f} ms", f"{spawn_cpu[1]:.1f} / {spawn_cpu[2]:.1f} ms"),
        ("uvmd resident memory", f"{res['uvmd_rss_mib']:.1f} MiB", ""),
    ]
    write_results(a.out, "boot-exec", res, rows, value_width=10)
    if a.only is None:
        lifecycle_bench(a.out)
    if a.only is None:
        bench_network(a.out)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_everything(home):
    """The VM and uvmd of `home` gone, as if nothing had ever run."""
    r = uvm(home, "status", "--format", "json", check=False)
    pid = (json.loads(r.stdout or "{}") or {}).get("daemonPID")
    uvm(home, "stop", check=False)
    if pid:
        try: os.kill(pid, signal.SIGTERM)
        except OSError: pass
        while pid_alive(pid):
            time.sleep(0.01)


def cold_prompt(home, config):
    """`uvm` on a pty with nothing running, until the shell has answered the first command."""
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(UVM, [UVM], env(home, config))
    os.write(fd, b"echo READY-$((40+2))\n")
    seen = b""
    deadline = time.time() + 300
    while b"READY-42" not in seen and time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    elapsed = time.perf_counter() - t0
    os.write(fd, b"exit\n")
    os.waitpid(pid, 0)
    os.close(fd)
    if b"READY-42" not in seen:
        sys.exit(f"bench: no prompt from uvm: {seen[-500:]!r}")
    return elapsed


def lifecycle_bench(out, runs=3):
    home = tempfile.mkdtemp(prefix="uvm-bench-lc-")
    config = os.path.join(home, "uvm.conf")
    instance_idle, vm_idle = 1.0, 2.0
    with open(config, "w") as f:
        f.write(f"[vm]\nvmIdleTimeout = {int(vm_idle * 1000)}ms\n[general]\ninstanceIdleTimeout = {int(instance_idle * 1000)}ms\n")
    uvm(home, "exec", "--", "true", config=config)  # installs the distro
    prompt, gone = [], []
    for i in range(runs):
        stop_everything(home)
        prompt.append(cold_prompt(home, config))
        print(f"  cold uvm to prompt {i + 1}/{runs}: {prompt[-1]:.2f} s", file=sys.stderr)
    for i in range(runs):
        # VM up; the exec below is then the last client.
        uvm(home, "exec", "--", "true", config=config)
        st = json.loads(uvm(home, "status", "--format", "json").stdout)
        t0 = time.perf_counter()
        uvm(home, "exec", "--", "true", config=config)
        t_last = time.perf_counter()
        qemu = st.get("qemuPID")
        if not qemu:
            sys.exit("bench: no QEMU pid in uvm status")
        while pid_alive(qemu) and time.perf_counter() - t_last < 120:
            time.sleep(0.01)
        gone.append(time.perf_counter() - t_last)
        print(f"  reaper {i + 1}/{runs}: QEMU gone {gone[-1]:.2f} s after the last exec (exec took {t_last - t0:.2f} s)", file=sys.stderr)
    faults = []
    for i in range(runs):
        p = subprocess.Popen([UVM, "exec", "--", "sleep", "1000"], env=env(home, config), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            st = json.loads(uvm(home, "status", "--format", "json").stdout)
            if st.get("clients") == 1 and st.get("qemuPID") and any(i.get("state") == "Running" for i in st.get("instances", [])):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # the sleep is running in the guest by now
        t0 = time.perf_counter()
        os.kill(st["qemuPID"], signal.SIGKILL)
        p.wait()
        faults.append(time.perf_counter() - t0)
        err = p.stderr.read().decode().strip()
        print(f"  fault {i + 1}/{runs}: client ended {faults[-1] * 1000:.0f} ms after kill -9 of QEMU ({p.returncode}: {err})", file=sys.stderr)
    stop_everything(home)
    configured = instance_idle + vm_idle
    res = {
        "cold_uvm_to_prompt_s": {"median": statistics.median(prompt), "runs": prompt},
        "reaper_qemu_gone_s": {"median": statistics.median(gone), "runs": gone},
        "instanceIdleTimeout_s": instance_idle,
        "vmIdleTimeout_s": vm_idle,
        "teardown_beyond_timeouts_s": statistics.median(gone) - configured,
        "qemu_killed_client_error_ms": {"median": statistics.median(faults) * 1000, "runs": [f * 1000 for f in faults]},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = [
        ("cold `uvm` (no uvmd, no VM) to a usable prompt (median)", f"{res['cold_uvm_to_prompt_s']['median']:.2f} s", f"{runs} runs, on a pty"),
        ("QEMU gone after the last client (median)", f"{res['reaper_qemu_gone_s']['median']:.2f} s", f"{runs} runs"),
        ("  configured instanceIdleTimeout + vmIdleTimeout", f"{configured:.2f} s", f"{instance_idle:g} s + {vm_idle:g} s"),
        ("  clean teardown beyond the timeouts", f"{res['teardown_beyond_timeouts_s']:.2f} s", "instance stop + sync + power-off"),
        ("QEMU killed -9: running `uvm exec` ends with its error (median)", f"{res['qemu_killed_client_error_ms']['median']:.0f} ms", "goal < 1 s"),
    ]
    write_results(out, "lifecycle", res, rows, value_width=10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=600):
    """One connection: connect, GET, read to EOF. Returns (bytes received, seconds)."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        n = 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
    return n, time.perf_counter() - t


def wait_served(port, path, timeout):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if http_get(port, path, timeout=5)[0] > 0:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def bench_network(out, big_mib=256, rounds=3, conns=200):
    home = tempfile.mkdtemp(prefix="uvm-bench-net-")
    # QEMU's hostfwd connections bypass uvm, so they are not clients: a slow hostfwd download
    # outlived instanceIdleTimeout (15 s), the reaper stopped the instance and its httpd, and the
    # peer's download came back short ("hostfwd download short") with every later one refused.
    # The instance stays for the whole comparison. uvmd reads this when the first command starts it.
    os.environ["UVM_INSTANCE_IDLE_TIMEOUT"] = "never"
    port = 8080
    uvm(home, "exec", "--", "true")
    st = json.loads(uvm(home, "status", "--format", "json").stdout)
    domain, uri = st["domain"], st["libvirtURI"]
    # /dev/shm is a tmpfs: the file comes from memory, not the emulated disk.
    uvm(home, "exec", "--", "sh", "-c",
        f"mkdir -p /dev/shm/www && head -c {big_mib << 20} /dev/zero > /dev/shm/www/big && echo hello > /dev/shm/www/small")
    t0 = time.perf_counter()
    uvm(home, "exec", "--", "httpd", "-p", str(port), "-h", "/dev/shm/www")
    if not wait_served(port, "/small", 30):
        sys.exit("bench: the guest's httpd never showed up on 127.0.0.1:%d" % port)
    appear = time.perf_counter() - t0
    # QEMU's own forwarding to the same server in the same VM (libvirt's user network is hostnet0).
    hport = free_port()
    def monitor(cmd):
        r = subprocess.run(["virsh", "-c", uri, "qemu-monitor-command", domain, "--hmp", cmd], capture_output=True, text=True)
        # hostfwd_add prints nothing when it worked; hostfwd_remove says what it removed.
        if r.returncode != 0 or (cmd.startswith("hostfwd_add") and r.stdout.strip()):
            raise RuntimeError(f"bench: monitor {cmd!r} failed: {r.stdout.strip()} {r.stderr.strip()}")
    try:
        monitor(f"hostfwd_add hostnet0 tcp:127.0.0.1:{hport}-:{port}")
        if not wait_served(hport, "/small", 30):
            sys.exit("bench: hostfwd never served")
        thr = {"uvm": [], "hostfwd": []}
        # A short or failed download by the peer (QEMU's hostfwd cuts one off mid-stream, or resets
        # it, on a busy machine) is recorded and retried up to 3 times; a round it never completes
        # is recorded and left out, and the benchmark goes on. Ours must not fail at all.
        retried = []
        for i in range(rounds):
            for name, p in (("uvm", port), ("hostfwd", hport)):
                for attempt in range(4 if name == "hostfwd" else 1):
                    try:
                        n, dt = http_get(p, "/big")
                    except OSError as e:
                        n, dt = -1, str(e)
                    if n >= big_mib << 20:
                        thr[name].append(n / dt / 1e6)
                        break
                    if name == "uvm":
                        sys.exit(f"bench: uvm download short: {n} bytes ({dt if n < 0 else 'connection ended early'})")
                    why = f"delivered {n} of {big_mib << 20} bytes" if n >= 0 else f"failed: {dt}"
                    retried.append(f"round {i + 1}: hostfwd {why}; " + ("retried" if attempt < 3 else "round left out"))
                    print(f"  {retried[-1]}", file=sys.stderr)
            peer = f"{thr['hostfwd'][-1]:.1f} MB/s" if not retried or not retried[-1].startswith(f"round {i + 1}:") \
                or not retried[-1].endswith("left out") else "failed"
            print(f"  throughput round {i + 1}/{rounds}: uvm {thr['uvm'][-1]:.1f} MB/s, hostfwd {peer}", file=sys.stderr)
        lat = {"uvm": [], "hostfwd": []}
        peer_failed = 0
        for i in range(conns // 20):
            for name, p in (("uvm", port), ("hostfwd", hport)):
                for _ in range(20):
                    try:
                        lat[name].append(http_get(p, "/small", timeout=30)[1])
                    except OSError:
                        if name == "uvm":
                            raise
                        peer_failed += 1
        if peer_failed:
            retried.append(f"hostfwd failed {peer_failed} of {conns} tiny connections (left out)")
        # What a connection costs the guest: ours runs the agent's relay, hostfwd only the
        # guest kernel's TCP over virtio-net; both run the same httpd.
        cpu = {name: guest_cpu_per(home, conns // 2, lambda p=p: [http_get(p, "/small", timeout=30) for _ in range(conns // 2)])
               for name, p in (("uvm", port), ("hostfwd", hport))}
    finally:
        # Whatever happened, leave no VM or uvmd behind.
        st = json.loads(uvm(home, "status", "--format", "json").stdout)
        uvm(home, "stop", check=False)
        if st.get("daemonPID"):
            try: os.kill(st["daemonPID"], 15)
            except OSError: pass
        shutil.rmtree(home, ignore_errors=True)
        os.environ.pop("UVM_INSTANCE_IDLE_TIMEOUT", None)

    if not thr["hostfwd"] or not lat["hostfwd"]:
        sys.exit("bench: QEMU's hostfwd failed every round: " + "; ".join(retried))
    med = {k: statistics.median(v) for k, v in thr.items()}
    p50 = {k: pct(v, 50) * 1000 for k, v in lat.items()}
    p99 = {k: pct(v, 99) * 1000 for k, v in lat.items()}
    res = {
        "accelerator": st.get("accelerator"),
        "forward_appears_s": appear,
        "throughput_MBps": {k: {"median": med[k], "runs": thr[k]} for k in thr},
        "throughput_ratio_uvm_to_hostfwd": med["uvm"] / med["hostfwd"],
        "peer_retries": retried,
        "connection_ms": {k: {"p50": p50[k], "p99": p99[k], "runs": len(lat[k])} for k in lat},
        "connection_p50_ratio_hostfwd_to_uvm": p50["hostfwd"] / p50["uvm"],
        "guest_cpu_ms_per_connection": {k: dict(zip(["busy", "user", "system"], v)) for k, v in cpu.items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": os.uname().nodename,
    }
    rows = [
        ("accelerator", str(res["accelerator"]).upper(), ""),
        ("guest port on host 127.0.0.1 after uvm exec -- httpd", f"{appear:.2f} s", "incl. one request"),
        (f"download {big_mib} MiB via uvm forwarding (median)", f"{med['uvm']:.1f} MB/s", f"{rounds} runs"),
        (f"download {big_mib} MiB via QEMU hostfwd (median)", f"{med['hostfwd']:.1f} MB/s", "same guest server"),
        ("throughput ratio uvm / hostfwd (goal >= 1)", f"{res['throughput_ratio_uvm_to_hostfwd']:.2f}",
         f"hostfwd: {len(retried)} failure(s), see peer_retries in network.json" if retried else ""),
        ("connection (connect+GET tiny+EOF) uvm p50 / p99", f"{p50['uvm']:.1f} / {p99['uvm']:.1f} ms", f"{len(lat['uvm'])} conns"),
        ("connection (connect+GET tiny+EOF) hostfwd p50 / p99", f"{p50['hostfwd']:.1f} / {p99['hostfwd']:.1f} ms", ""),
        ("latency ratio hostfwd / uvm p50 (goal >= 1)", f"{res['connection_p50_ratio_hostfwd_to_uvm']:.2f}", ""),
        *[(f"guest CPU per connection via {k}: busy", f"{v[0]:.1f} ms", f"user {v[1]:.1f} / system {v[2]:.1f} ms, {conns // 2} conns")
          for k, v in cpu.items()],
    ]
    write_results(out, "network", res, rows, value_width=16)


if __name__ == "__main__":
    if sys.argv[1:2] == ["lifecycle"]:
        # Only this section: scripts/bench.py lifecycle [--out DIR]
        ap = argparse.ArgumentParser()
        ap.add_argument("--out", default="bench-results")
        ap.add_argument("--runs", type=int, default=3)
        a = ap.parse_args(sys.argv[2:])
        os.makedirs(a.out, exist_ok=True)
        lifecycle_bench(a.out, a.runs)
    else:
        main()
