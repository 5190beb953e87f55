#!/usr/bin/env python3
"""Distribution benchmarks (make bench), each next to what it is built from, in one run:

  install  `uvm install debian` with an empty root file system cache (the VM running), against `mmdebstrap` alone
           (run before and after it; their mean) with the same variant, package list and host apt
           sources, writing the same zstd tarball.
  import   `uvm import` of that tarball into the running VM, against `tar -x` of it into a
           folder of the host's tmpfs (/dev/shm).
  export   `uvm export` of the imported distro to a file in /dev/shm, against `tar -c` of the
           files just extracted there.
  cold     `uvm exec --distro debian -- true` with the VM stopped, against the same for the
           busybox distro, alternately.
  ssh      warm `uvm exec --distro debian -- true` against `ssh` into the same distro (its own
           openssh-server, key auth, through uvm's localhost forwarding) running `true`, alternately.

Ratios are ours / theirs: below 1 means uvm is faster. Results go to bench-results/distros.*.
"""
import json, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import UVM, uvm, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(args, **kw):
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return time.perf_counter() - t, r


def packages():
    with open(os.path.join(ROOT, "images/debian/packages")) as f:
        return [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]


def ssh_vs_exec(home, e, distro, res, runs=15, port=2222):
    """Warm `uvm exec --distro D -- true` next to `ssh` into the same distro running `true`:
    openssh-server from the distro's own mirror, key auth, reached through uvm's forwarding of the
    guest port to the host's loopback. Alternately, in one run."""
    keydir = tempfile.mkdtemp(prefix="uvm-bench-ssh-")
    key = os.path.join(keydir, "key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    pub = open(key + ".pub").read().strip()
    run = lambda *a: timed_run([UVM, "exec", "--distro", distro, *a], env=e)[1]
    # No service may start during the install (systemd would start ssh on port 22, which uvm would
    # then forward on the host); the benchmark's sshd listens on its own port and reads its own
    # key file, so nothing of the user's home is touched.
    run("--user", "root", "--", "sh", "-c",
        "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && "
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null && "
        "rm -f /usr/sbin/policy-rc.d && "
        f"echo '{pub}' > /etc/ssh/uvm-bench-key && mkdir -p /run/sshd && "
        f"/usr/sbin/sshd -p {port} -o AuthorizedKeysFile=/etc/ssh/uvm-bench-key -o PasswordAuthentication=no")
    user = run("--", "id", "-un").stdout.strip()
    ssh = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
           f"{user}@127.0.0.1", "true"]
    # The forwarded port appears within a second or two of sshd listening.
    deadline = time.time() + 60
    while subprocess.run(ssh, capture_output=True).returncode != 0:
        if time.time() > deadline:
            sys.exit(f"bench: ssh into {distro} never worked: {subprocess.run(ssh, capture_output=True, text=True).stderr.strip()}")
        time.sleep(1)
    res["warm_exec_debian_s"], res["ssh_true_s"] = [], []
    for _ in range(runs):
        res["warm_exec_debian_s"].append(timed_run([UVM, "exec", "--distro", distro, "--", "true"], env=e)[0])
        res["ssh_true_s"].append(timed_run(ssh)[0])
    run("--user", "root", "--", "sh", "-c", "pkill -x sshd || true")
    shutil.rmtree(keydir, ignore_errors=True)


def main(out="bench-results", cold_runs=3):
    os.makedirs(out, exist_ok=True)
    home = tempfile.mkdtemp(prefix="uvm-bench-distros-")
    cache = tempfile.mkdtemp(prefix="uvm-bench-cache-")
    res = {}
    try:
        env = {"XDG_CACHE_HOME": cache}
        # The VM stays up between the steps (the idle reaper would stop it during a 40 s
        # mmdebstrap): install and import are measured with it running, as after any command.
        os.environ["UVM_VM_IDLE_TIMEOUT"] = "never"
        uvm(home, "exec", "--", "true")
        # install: the recipe with nothing cached (its own cache folder).
        e = dict(os.environ, UVM_HOME=home, UVMD_PATH=os.path.join(os.path.dirname(UVM), "uvmd"),
                 XDG_CONFIG_HOME=os.path.join(home, "config"), UVM_RECIPES=os.path.join(ROOT, "images"), **env)
        # mmdebstrap alone, before and after the install (the mirror's speed drifts), with what the
        # recipe gives it: the host's apt sources for bookworm (images/debian/sources.py), the
        # variant and the package list; no mirror check, no hooks, no import.
        srcdir = tempfile.mkdtemp(prefix="uvm-bench-sources-")
        subprocess.run(["python3", os.path.join(ROOT, "images/debian/sources.py"), "bookworm", "/etc/apt/sources.list",
                        "/etc/apt/sources.list.d", srcdir], check=True, capture_output=True)
        mirrors = [os.path.join(d, f) for d, _, fs in os.walk(srcdir) for f in sorted(fs)]
        alone_cmd = lambda out: ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages()), "bookworm", out] + mirrors
        res["mmdebstrap_runs_s"] = []
        for i in range(2):
            if i == 1:
                res["install_s"], _ = timed_run([UVM, "install", "debian", "--name", "bdeb"], env=e)
            alone = os.path.join(cache, f"alone{i}.tar.zst")
            t, _ = timed_run(alone_cmd(alone))
            res["mmdebstrap_runs_s"].append(t)
            os.unlink(alone)
        shutil.rmtree(srcdir, ignore_errors=True)
        res["mmdebstrap_s"] = sum(res["mmdebstrap_runs_s"]) / 2
        tarball = subprocess.run(["bash", os.path.join(ROOT, "images/debian/build.sh")], env=e, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
        # import of the same tarball, against tar -x into tmpfs.
        res["import_s"], _ = timed_run([UVM, "import", "bimp", tarball], env=e)
        shm = tempfile.mkdtemp(prefix="uvm-bench-", dir="/dev/shm")
        try:
            res["tar_x_tmpfs_s"], _ = timed_run(["tar", "--zstd", "-xf", tarball, "-C", shm]
                                                + ([] if os.geteuid() == 0 else ["--no-same-owner"]))
            # export of that distro to a tmpfs file, against tar -c of the tree just extracted.
            res["tar_c_tmpfs_s"], _ = timed_run(["tar", "-cf", shm + ".tar", "-C", shm, "."])
            res["export_s"], _ = timed_run([UVM, "export", "bimp", shm + ".uvm.tar"], env=e)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
            for f in (shm + ".tar", shm + ".uvm.tar"):
                if os.path.exists(f):
                    os.unlink(f)
        # cold exec: debian against busybox, alternately.
        res["cold_debian_s"], res["cold_busybox_s"] = [], []
        for _ in range(cold_runs):
            for name in ("debian", "busybox"):
                uvm(home, "stop")
                distro = "bdeb" if name == "debian" else "busybox"
                t, _ = timed_run([UVM, "exec", "--distro", distro, "--", "true"], env=e)
                res[f"cold_{name}_s"].append(t)
        med = lambda v: sorted(v)[len(v) // 2]
        ssh_vs_exec(home, e, "bdeb", res)
        rows = [
            ("install debian (no cache)", f"{res['install_s']:.1f} s", f"mmdebstrap alone {res['mmdebstrap_s']:.1f} s (mean of {res['mmdebstrap_runs_s'][0]:.1f} before, {res['mmdebstrap_runs_s'][1]:.1f} after), ratio {res['install_s'] / res['mmdebstrap_s']:.2f}"),
            ("import (Debian tarball)", f"{res['import_s']:.1f} s", f"tar -x into tmpfs {res['tar_x_tmpfs_s']:.1f} s, ratio {res['import_s'] / res['tar_x_tmpfs_s']:.2f}"),
            ("export (that distro)", f"{res['export_s']:.1f} s", f"tar -c of its files in tmpfs {res['tar_c_tmpfs_s']:.1f} s, ratio {res['export_s'] / res['tar_c_tmpfs_s']:.2f}"),
            ("cold exec --distro debian", f"{med(res['cold_debian_s']):.2f} s", f"busybox {med(res['cold_busybox_s']):.2f} s (medians of {cold_runs}), ratio {med(res['cold_debian_s']) / med(res['cold_busybox_s']):.2f}"),
            ("warm exec --distro debian -- true", f"{med(res['warm_exec_debian_s']) * 1000:.0f} ms", f"median of {len(res['warm_exec_debian_s'])}"),
            ("ssh into that distro -- true", f"{med(res['ssh_true_s']) * 1000:.0f} ms", f"key auth, through uvm's forwarded port; median of {len(res['ssh_true_s'])}"),
            ("ssh / uvm exec (goal >= 10)", f"{med(res['ssh_true_s']) / med(res['warm_exec_debian_s']):.1f}", "alternately, in one run"),
        ]
        write_results(out, "distros", res, rows, 10)
    finally:
        subprocess.run([UVM, "stop"], env=dict(os.environ, UVM_HOME=home), capture_output=True)
        lock = os.path.join(home, "state", "uvmd.lock")
        try:
            os.kill(int(open(lock).read().strip()), 15)
        except (OSError, ValueError):
            pass
        time.sleep(1)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
