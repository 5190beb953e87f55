#define _GNU_SOURCE
#include "csyscalls.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

// Messages on the status pipe between the spawning process, the helper and the final child.
enum { MSG_PID = 1, MSG_ERROR = 2 };
typedef struct { int kind; int value; const char *stage; } spawn_msg;

static void send_msg(int fd, int kind, int value, const char *stage) {
    spawn_msg m = { kind, value, stage };
    ssize_t r;
    do { r = write(fd, &m, sizeof m); } while (r < 0 && errno == EINTR);
}

static _Noreturn void child_fail(int fd, const char *stage) {
    send_msg(fd, MSG_ERROR, errno, stage);
    _exit(127);
}

// Closes every descriptor from 3 up but `keep` (-1: none): close_range instead of a close()
// per possible number, which was a thousand syscalls per process started (each emulated work
// under TCG) and missed anything above 1023.
static void close_from_3_except(int keep) {
    if (keep > 3 && syscall(SYS_close_range, 3, keep - 1, 0) < 0) goto fallback;
    if (syscall(SYS_close_range, keep >= 3 ? keep + 1 : 3, ~0U, 0) < 0) goto fallback;
    return;
fallback:  // a kernel before 5.9
    for (int fd = 3; fd < 1024; fd++) if (fd != keep) close(fd);
}

// Handlers first, then the mask: a child sharing our memory must never run one of our handlers.
static void reset_signals(void) {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++) sigaction(s, &dfl, NULL);  // fails harmlessly for KILL/STOP
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

// execve over each PATH entry, the request's PATH (execvpe would use the agent's environment).
static void exec_in_path(const uvm_spawn_args *a) {
    const char *file = a->argv[0];
    if (strchr(file, '/')) { execve(file, a->argv, a->envp); return; }
    const char *p = a->path_env && *a->path_env ? a->path_env : "/usr/local/bin:/usr/bin:/bin";
    int saved = ENOENT;
    char buf[4096];
    size_t flen = strlen(file);
    while (*p) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        if (dlen + 1 + flen + 1 <= sizeof buf) {
            memcpy(buf, p, dlen);
            size_t off = dlen;
            if (off == 0) buf[off++] = '.';
            buf[off++] = '/';
            memcpy(buf + off, file, flen + 1);
            execve(buf, a->argv, a->envp);
            if (errno != ENOENT && errno != ENOTDIR) saved = errno;  // e.g. EACCES: remember it
        }
        if (!end) break;
        p = end + 1;
    }
    errno = saved;
}

static _Noreturn void final_child(const uvm_spawn_args *a, int status_fd) {
    reset_signals();
    if (setsid() < 0) child_fail(status_fd, "setsid");
    if (a->tty && ioctl(a->stdin_fd, TIOCSCTTY, 0) < 0) child_fail(status_fd, "controlling tty");
    int fds[3] = { a->stdin_fd, a->stdout_fd, a->stderr_fd };
    // Move the sources out of 0..2 first so that dup2 of one cannot clobber another.
    for (int i = 0; i < 3; i++) {
        if (fds[i] >= 0 && fds[i] < 3) {
            int moved = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
            if (moved < 0) child_fail(status_fd, "dup");
            for (int j = i + 1; j < 3; j++) if (fds[j] == fds[i]) fds[j] = moved;
            fds[i] = moved;
        }
    }
    for (int i = 0; i < 3; i++) {
        if (fds[i] < 0) continue;
        if (dup2(fds[i], i) < 0) child_fail(status_fd, "dup2");
    }
    // Raw syscalls: glibc's wrappers would broadcast the change to every thread it believes
    // this process has, which in a CLONE_VM child are the agent's threads (some blocked in
    // their own vfork): a deadlock. posix_spawn does the same.
    if (syscall(SYS_setgroups, (size_t)a->ngroups, a->groups) < 0) child_fail(status_fd, "setgroups");
    if (syscall(SYS_setgid, a->gid) < 0) child_fail(status_fd, "setgid");
    if (syscall(SYS_setuid, a->uid) < 0) child_fail(status_fd, "setuid");
    if (chdir(a->cwd ? a->cwd : "/") < 0 && (!a->fallback_cwd || chdir(a->fallback_cwd) < 0)) child_fail(status_fd, "chdir");
    // Everything above 2 except the status pipe (close-on-exec) goes.
    close_from_3_except(status_fd);
    exec_in_path(a);
    child_fail(status_fd, "exec");
}

// The helper and the final process share the agent's memory until exec (CLONE_VM|CLONE_VFORK,
// as posix_spawn does): no page tables copied, no copy-on-write faults afterwards, which under
// TCG is most of the cost of starting a process from a large, threaded parent.
enum { SPAWN_STACK = 64 * 1024 };

typedef struct {
    const uvm_spawn_args *a;
    int status_fd;
    int nsfd[4];
    int rootfd;
    char *final_stack;
} spawn_ctx;

static int final_main(void *arg) {
    spawn_ctx *c = arg;
    final_child(c->a, c->status_fd);
}

static int helper_main(void *arg) {
    spawn_ctx *c = arg;
    if (c->a->instance_pid > 0) {
        // Into the instance's cgroup first (the final process inherits it), then its cgroup
        // namespace, where that cgroup's instance is the root.
        if (c->a->cgroup_procs_fd >= 0 && write(c->a->cgroup_procs_fd, "0", 1) != 1) child_fail(c->status_fd, "join cgroup");
        static const int types[4] = { CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWPID, CLONE_NEWNS };
        for (int i = 0; i < 4; i++)
            if (setns(c->nsfd[i], types[i]) < 0) child_fail(c->status_fd, "setns");
        // setns(mnt) puts us at the namespace's bottom mount; the instance's root is the
        // file system moved on top of it, which /proc/PID/root names exactly.
        if (fchdir(c->rootfd) < 0 || chroot(".") < 0) child_fail(c->status_fd, "chroot");
    }
    // CLONE_PARENT: the final process is uvm-init's child (so it can waitpid it) although it
    // was created here, inside the instance's pid namespace.
    pid_t child = clone(final_main, c->final_stack + SPAWN_STACK,
                        CLONE_VM | CLONE_VFORK | CLONE_PARENT | SIGCHLD, c);
    if (child < 0) child_fail(c->status_fd, "clone");
    send_msg(c->status_fd, MSG_PID, child, NULL);
    _exit(0);
}

pid_t uvm_spawn(const uvm_spawn_args *a, pid_t *helper_pid, pid_t *failed_pid, int *err_errno, const char **err_stage) {
    *helper_pid = 0;
    *failed_pid = 0;
    spawn_ctx c = { a, -1, { -1, -1, -1, -1 }, -1, NULL };
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0) { *err_errno = errno; *err_stage = "pipe"; return -1; }
    c.status_fd = pipefd[1];
    pid_t result = -1;
    char *stacks = mmap(NULL, 2 * SPAWN_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stacks == MAP_FAILED) { *err_errno = errno; *err_stage = "stack"; stacks = NULL; goto out; }
    c.final_stack = stacks + SPAWN_STACK;

    if (a->instance_pid > 0) {
        // Opened before any setns: afterwards /proc is the instance's.
        static const char *names[4] = { "cgroup", "uts", "pid", "mnt" };
        char path[64];
        for (int i = 0; i < 4; i++) {
            snprintf(path, sizeof path, "/proc/%d/ns/%s", (int)a->instance_pid, names[i]);
            c.nsfd[i] = open(path, O_RDONLY | O_CLOEXEC);
            if (c.nsfd[i] < 0) { *err_errno = errno; *err_stage = "open namespace"; goto out; }
        }
        snprintf(path, sizeof path, "/proc/%d/root", (int)a->instance_pid);
        c.rootfd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (c.rootfd < 0) { *err_errno = errno; *err_stage = "open instance root"; goto out; }
    }

    // No handler of ours may run in a child that shares our memory: block everything until
    // the children have reset their handlers.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t helper = clone(helper_main, stacks + SPAWN_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &c);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (helper < 0) { *err_errno = clone_errno; *err_stage = "clone"; goto out; }
    *helper_pid = helper;

    // CLONE_VFORK: both children have exec'd or exited by now. Read what they reported: the pid
    // from the helper, an error from whichever stage failed.
    close(pipefd[1]);
    pipefd[1] = -1;
    pid_t pid = -1;
    int got_error = 0;
    spawn_msg m;
    for (;;) {
        ssize_t r = read(pipefd[0], &m, sizeof m);
        if (r < 0 && errno == EINTR) continue;
        if (r != (ssize_t)sizeof m) break;
        if (m.kind == MSG_PID) pid = m.value;
        else if (m.kind == MSG_ERROR && !got_error) { got_error = 1; *err_errno = m.value; *err_stage = m.stage; }
    }
    if (!got_error && pid < 0) { *err_errno = ECHILD; *err_stage = "helper died"; }
    if (!got_error && pid > 0) result = pid;
    if (got_error && pid > 0) *failed_pid = pid;

out:
    for (int i = 0; i < 4; i++) if (c.nsfd[i] >= 0) close(c.nsfd[i]);
    if (c.rootfd >= 0) close(c.rootfd);
    close(pipefd[0]);
    if (pipefd[1] >= 0) close(pipefd[1]);
    if (stacks) munmap(stacks, 2 * SPAWN_STACK);
    return result;
}

// ---- distro instances -------------------------------------------------------------------

static volatile sig_atomic_t instance_stop_requested = 0;
static void on_instance_term(int sig) { (void)sig; instance_stop_requested = 1; }
static void on_instance_chld(int sig) { (void)sig; }

static int mount_in(const char *root, const char *rel, const char *src, const char *fstype,
                    unsigned long flags, const char *data) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", root, rel);
    mkdir(path, 0755);
    return mount(src, path, fstype, flags, data);
}

/// mkdir -p of `rel` (absolute, inside the instance) below `root`.
static void mkdir_below(const char *root, const char *rel) {
    char path[512];
    size_t n = (size_t)snprintf(path, sizeof path, "%s%s", root, rel);
    if (n >= sizeof path) return;
    for (char *p = path + strlen(root) + 1; *p; p++) {
        if (*p == '/') { *p = 0; mkdir(path, 0755); *p = '/'; }
    }
    mkdir(path, 0755);
}

/// The initramfs's static `uvm-host` (interop), read-only, at ROOT/DIR/NAME in the instance,
/// whatever the distro holds. Best effort: without it only interop is missing.
#define UVM_HOST_BINARY "/uvm-host"
static void bind_host_command(const char *root, const char *dir, const char *name) {
    char path[512];
    mkdir_below(root, dir);
    if ((size_t)snprintf(path, sizeof path, "%s%s/%s", root, dir, name) >= sizeof path) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
    if (fd < 0) return;
    close(fd);
    // By its path in our namespace (a bind's source must be in it), from the initramfs.
    if (mount(UVM_HOST_BINARY, path, NULL, MS_BIND, NULL) == 0)
        mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
}

/// Writes "0" (the calling process) to DIR/cgroup.procs.
static int join_cgroup(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int ok = write(fd, "0", 1) == 1;
    close(fd);
    return ok ? 0 : -1;
}

static _Noreturn void instance_main(const char *mp,
                                    const char *hostname, const char *shares_at, const char *cgroup_dir,
                                    const char *init_path, int status_fd) {
    reset_signals();
    if (cgroup_dir) {
        // The instance's own cgroup becomes the root of its cgroup namespace, so that its
        // systemd (or a container engine) manages a tree of its own; the init itself lives in
        // the leaf init.scope, where systemd expects to find itself.
        char scope[512];
        snprintf(scope, sizeof scope, "%s/init.scope", cgroup_dir);
        if (join_cgroup(cgroup_dir) < 0) child_fail(status_fd, "join the instance's cgroup");
        if (unshare(CLONE_NEWCGROUP) < 0) child_fail(status_fd, "cgroup namespace");
        if (join_cgroup(scope) < 0) child_fail(status_fd, "join init.scope");
    }
    // Slave, not private: mounts made here stay here, but shares the agent mounts under
    // UVM_SHARES_DIR later (a shared mount) still reach this instance.
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0) child_fail(status_fd, "make / slave");
    if (mount_in(mp, "/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) child_fail(status_fd, "mount /proc");
    if (mount_in(mp, "/sys", "sysfs", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) child_fail(status_fd, "mount /sys");
    if (cgroup_dir && mount_in(mp, "/sys/fs/cgroup", "cgroup2", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        child_fail(status_fd, "mount /sys/fs/cgroup");
    if (mount_in(mp, "/dev", "devtmpfs", "devtmpfs", MS_NOSUID, "mode=0755") < 0) child_fail(status_fd, "mount /dev");
    if (mount_in(mp, "/dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5") < 0)
        child_fail(status_fd, "mount /dev/pts");
    char ptmx[512], pts_ptmx[512];
    snprintf(ptmx, sizeof ptmx, "%s/dev/ptmx", mp);
    snprintf(pts_ptmx, sizeof pts_ptmx, "%s/dev/pts/ptmx", mp);
    if (mount(pts_ptmx, ptmx, NULL, MS_BIND, NULL) < 0) child_fail(status_fd, "bind /dev/ptmx");
    if (mount_in(mp, "/dev/shm", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0) child_fail(status_fd, "mount /dev/shm");
    if (mount_in(mp, "/run", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0) child_fail(status_fd, "mount /run");
    // uvm-host is always on a session's PATH (it says how to turn interop on when it is off);
    // xdg-open only while interop is on, when that folder comes first.
    bind_host_command(mp, "/run/uvm/bin", "uvm-host");
    bind_host_command(mp, "/run/uvm/interop", "xdg-open");
    {
        // A bind of a slave mount is a slave of the same master: the shares ([automount] root,
        // /mnt/host by default) follow the agent.
        char host[512];
        mkdir_below(mp, shares_at);
        snprintf(host, sizeof host, "%s%s", mp, shares_at);
        struct stat st;
        if (stat(UVM_SHARES_DIR, &st) == 0 && mount(UVM_SHARES_DIR, host, NULL, MS_BIND | MS_REC, NULL) < 0)
            child_fail(status_fd, "bind the shares");
    }
    if (hostname && sethostname(hostname, strlen(hostname)) < 0) child_fail(status_fd, "sethostname");
    // The initramfs root cannot be pivot_root'ed away (it is rootfs), so move the disk onto /
    // and chroot, as switch_root does.
    if (chdir(mp) < 0) child_fail(status_fd, "chdir root");
    if (mount(mp, "/", NULL, MS_MOVE, NULL) < 0) child_fail(status_fd, "move root");
    if (chroot(".") < 0 || chdir("/") < 0) child_fail(status_fd, "chroot");

    if (init_path) {
        // The distro's own init (systemd) as PID 1 of the instance. `container` tells systemd it
        // runs in a container: no udev, no hardware units, and halt (SIGRTMIN+3) ends PID 1.
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null < 0) child_fail(status_fd, "open /dev/null");
        for (int fd = 0; fd < 3; fd++) if (dup2(null, fd) < 0) child_fail(status_fd, "dup2");
        close_from_3_except(status_fd);
        char *const argv[] = { (char *)init_path, NULL };
        char *const envp[] = { "container=uvm", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", NULL };
        execve(init_path, argv, envp);
        child_fail(status_fd, "exec the distro's init");
    }

    // Blocked outside sigsuspend: a SIGTERM or SIGCHLD that came between the checks below and a
    // pause() would have been handled there, and pause() would then sleep on regardless.
    sigset_t woken, waiting;
    sigemptyset(&woken);
    sigaddset(&woken, SIGTERM);
    sigaddset(&woken, SIGCHLD);
    sigprocmask(SIG_BLOCK, &woken, &waiting);
    sigdelset(&waiting, SIGTERM);
    sigdelset(&waiting, SIGCHLD);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_instance_term;
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_instance_chld;
    sigaction(SIGCHLD, &sa, NULL);
    close(status_fd);  // close-on-exec never happens here: closing is the "ready" signal
    if (syscall(SYS_close_range, 0, ~0U, 0) < 0) for (int fd = 0; fd < 1024; fd++) close(fd);

    // PID 1 of the instance: reap orphans; on SIGTERM give everyone 3 s, then end (the kernel
    // kills whatever is left when a pid namespace's init exits, and the mounts go with it).
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        if (instance_stop_requested) break;
        sigsuspend(&waiting);  // unblocks, sleeps and re-blocks atomically
    }
    sigprocmask(SIG_SETMASK, &waiting, NULL);
    kill(-1, SIGTERM);
    struct timespec step = { 0, 50 * 1000 * 1000 };
    for (int i = 0; i < 60; i++) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) break;
        nanosleep(&step, NULL);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0) {}
    // This distro's file system only: a global sync() would wait behind a 9P mount whose
    // server is gone, and this init could then never end.
    int root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root >= 0) { syncfs(root); close(root); }
    _exit(0);
}

pid_t uvm_start_instance(const char *mountpoint,
                         const char *hostname, const char *shares_at, const char *cgroup_dir,
                         const char *init_path, int *err_errno, const char **err_stage) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0) { *err_errno = errno; *err_stage = "pipe"; return -1; }
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | SIGCHLD, 0, 0, 0, 0);
    if (pid < 0) {
        *err_errno = errno; *err_stage = "clone";
        close(pipefd[0]); close(pipefd[1]);
        return -1;
    }
    if (pid == 0) {
        close(pipefd[0]);
        instance_main(mountpoint, hostname, shares_at, cgroup_dir, init_path, pipefd[1]);
    }
    close(pipefd[1]);
    spawn_msg m;
    ssize_t r;
    do { r = read(pipefd[0], &m, sizeof m); } while (r < 0 && errno == EINTR);
    close(pipefd[0]);
    if (r == (ssize_t)sizeof m && m.kind == MSG_ERROR) {
        *err_errno = m.value; *err_stage = m.stage;
        waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

// ---- PID 1 and port plumbing --------------------------------------------------------------

int uvm_wait_port_connected(int fd, int timeout_ms) {
    struct timespec step = { 0, 20 * 1000 * 1000 };
    int waited = 0;
    for (;;) {
        struct pollfd p = { fd, POLLOUT, 0 };
        int r = poll(&p, 1, 0);
        if (r > 0 && (p.revents & POLLOUT) && !(p.revents & POLLHUP)) return 0;
        if (timeout_ms >= 0 && waited >= timeout_ms) return -1;
        // While the host is away the port reports POLLHUP at once, so poll cannot block: sleep.
        nanosleep(&step, NULL);
        waited += 20;
    }
}

int uvm_readable_now(int fd) {
    struct pollfd p = { fd, POLLIN, 0 };
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) ? 1 : 0;
}

int uvm_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data) {
    mkdir(target, 0755);
    if (mount(source, target, fstype, flags, data) < 0 && errno != EBUSY) return errno;
    return 0;
}

int uvm_if_up(const char *name) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int rc = 0;
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) rc = errno;
    else {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) rc = errno;
    }
    close(s);
    return rc;
}

static int set_inet_addr(struct sockaddr *sa, const char *text) {
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    memset(in, 0, sizeof *in);
    in->sin_family = AF_INET;
    return inet_pton(AF_INET, text, &in->sin_addr) == 1 ? 0 : EINVAL;
}

int uvm_if_configure_ipv4(const char *name, const char *addr, int prefix, const char *gateway, const char **stage) {
    if (prefix < 0 || prefix > 32) { *stage = "prefix"; return EINVAL; }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { *stage = "socket"; return errno; }
    int rc = 0;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if ((rc = set_inet_addr(&ifr.ifr_addr, addr))) { *stage = "address"; goto out; }
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) { rc = errno; *stage = "SIOCSIFADDR"; goto out; }
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof *mask);
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = htonl(prefix == 0 ? 0 : 0xffffffffu << (32 - prefix));
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) { rc = errno; *stage = "SIOCSIFNETMASK"; goto out; }
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) { rc = errno; *stage = "SIOCGIFFLAGS"; goto out; }
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) { rc = errno; *stage = "SIOCSIFFLAGS"; goto out; }
    if (gateway) {
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        if ((rc = set_inet_addr(&rt.rt_gateway, gateway))) { *stage = "gateway"; goto out; }
        set_inet_addr(&rt.rt_dst, "0.0.0.0");
        set_inet_addr(&rt.rt_genmask, "0.0.0.0");
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = (char *)name;
        if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) { rc = errno; *stage = "SIOCADDRT"; goto out; }
    }
out:
    close(s);
    return rc;
}

int uvm_connect_loopback(unsigned short port, int wait_ms) {
    struct sockaddr_in v4 = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct sockaddr_in6 v6 = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    const struct sockaddr *addrs[2] = { (const struct sockaddr *)&v4, (const struct sockaddr *)&v6 };
    const socklen_t lens[2] = { sizeof v4, sizeof v6 };
    int err = ECONNREFUSED;
    for (int i = 0; i < 2; i++) {
        int s = socket(addrs[i]->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (s < 0) { err = errno; continue; }
        int r = connect(s, addrs[i], lens[i]);
        if (r < 0 && errno == EINPROGRESS) {
            struct pollfd p = { s, POLLOUT, 0 };
            do { r = poll(&p, 1, wait_ms); } while (r < 0 && errno == EINTR);
            if (r == 0) { close(s); errno = ETIMEDOUT; return -1; }
            int soerr = 0;
            socklen_t len = sizeof soerr;
            if (r < 0) soerr = errno;
            else if (getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0) soerr = errno;
            r = soerr ? -1 : 0;
            errno = soerr;
        }
        if (r == 0) {
            int one = 1;
            setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            return s;
        }
        err = errno;
        close(s);
    }
    errno = err;
    return -1;
}

static int diag_dump(int nl, int family, uvm_listener *out, int max, int count) {
    struct {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 req;
    } msg;
    memset(&msg, 0, sizeof msg);
    msg.nh.nlmsg_len = sizeof msg;
    msg.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.req.sdiag_family = family;
    msg.req.sdiag_protocol = IPPROTO_TCP;
    msg.req.idiag_states = 1 << 10;  // TCP_LISTEN
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    if (sendto(nl, &msg, sizeof msg, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) return -1;
    static __thread char buf[32768];
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_DONE) return count;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                errno = e->error ? -e->error : EIO;
                return -1;
            }
            struct inet_diag_msg *d = NLMSG_DATA(h);
            if (count < max) {
                uvm_listener *l = &out[count];
                l->family = d->idiag_family;
                l->port = ntohs(d->id.idiag_sport);
                memcpy(l->addr, d->id.idiag_src, 16);
                l->inode = d->idiag_inode;
            }
            count++;
        }
    }
}

int uvm_tcp_listeners(uvm_listener *out, int max) {
    int nl = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (nl < 0) return -1;
    int count = diag_dump(nl, AF_INET, out, max, 0);
    if (count >= 0) count = diag_dump(nl, AF_INET6, out, max, count);
    int saved = errno;
    close(nl);
    errno = saved;
    return count;
}

static void *sync_thread(void *done) {
    sync();
    __atomic_store_n((int *)done, 1, __ATOMIC_RELEASE);
    return NULL;
}

int uvm_poweroff(void) {
    // sync(), but bounded: behind a 9P mount whose server is gone it never returns, and the
    // machine must power off all the same.
    static int done = 0;
    pthread_t t;
    if (pthread_create(&t, NULL, sync_thread, &done) == 0) {
        struct timespec step = { 0, 10 * 1000 * 1000 };
        for (int i = 0; i < 500 && !__atomic_load_n(&done, __ATOMIC_ACQUIRE); i++) nanosleep(&step, NULL);
    } else {
        sync();
    }
    reboot(RB_POWER_OFF);
    return errno;
}

int uvm_set_winsize(int fd, unsigned short rows, unsigned short cols) {
    struct winsize ws = { rows, cols, 0, 0 };
    return ioctl(fd, TIOCSWINSZ, &ws) < 0 ? errno : 0;
}

int uvm_openpty(const char *ptmx, int *master, int *slave, unsigned short rows, unsigned short cols) {
    int m = open(ptmx, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (m < 0) return errno;
    int unlock = 0;
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0) { int e = errno; close(m); return e; }
    int s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s < 0) { int e = errno; close(m); return e; }
    if (rows && cols) uvm_set_winsize(m, rows, cols);
    *master = m;
    *slave = s;
    return 0;
}

int uvm_peer_uid(int fd, uid_t *uid, pid_t *pid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return errno;
    *uid = cred.uid;
    *pid = cred.pid;
    return 0;
}

int uvm_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC) < 0 ? errno : 0;
}

pid_t uvm_spawn_detached(const char *path, char *const argv[], const char *log_path) {
    return uvm_spawn_detached_fd3(path, argv, log_path, -1);
}

pid_t uvm_spawn_detached_fd3(const char *path, char *const argv[], const char *log_path, int keep_fd) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    setsid();
    reset_signals();
    int in = open("/dev/null", O_RDONLY);
    int log = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (in < 0 || log < 0) _exit(127);
    int keep = keep_fd >= 0 ? fcntl(keep_fd, F_DUPFD, 10) : -1;
    if (keep_fd >= 0 && keep < 0) _exit(127);
    dup2(in, 0);
    dup2(log, 1);
    dup2(log, 2);
    if (keep >= 0 && dup2(keep, 3) < 0) _exit(127);
    syscall(SYS_close_range, keep >= 0 ? 4 : 3, ~0U, 0);
    execv(path, argv);
    _exit(127);
}

/* In a forked child: in, out and err (-1: /dev/null) become 0, 1 and 2; _exit(127) on failure. */
static void child_stdio(int in, int out, int err) {
    int null = open("/dev/null", O_RDWR);
    if (null < 0) _exit(127);
    /* Above 2 first, so that dup2 into 0..2 cannot overwrite a source still needed. */
    int fds[3] = {in, out, err};
    for (int i = 0; i < 3; i++) fds[i] = fcntl(fds[i] >= 0 ? fds[i] : null, F_DUPFD, 3);
    for (int i = 0; i < 3; i++) if (fds[i] < 0 || dup2(fds[i], i) < 0) _exit(127);
}

pid_t uvm_spawn_with_fds(const char *path, char *const argv[], int in, int out, int err) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    reset_signals();
    child_stdio(in, out, err);
    syscall(SYS_close_range, 3, ~0U, 0);
    execv(path, argv);
    _exit(127);
}

pid_t uvm_spawn_host(const char *file, char *const argv[], char *const envp[], const char *cwd, const char *home,
                     int in, int out, int err) {
    int status[2];
    if (pipe2(status, O_CLOEXEC) < 0) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(status[0]);
        close(status[1]);
        return -1;
    }
    if (pid == 0) {
        close(status[0]);
        reset_signals();
        setpgid(0, 0);
        if (chdir(cwd) < 0 && (!home || chdir(home) < 0)) (void)chdir("/");
        child_stdio(in, out, err);
        // Everything else goes, the status pipe excepted (it is close-on-exec).
        close_from_3_except(status[1]);
        extern char **environ;
        environ = (char **)envp;
        execvp(file, argv);
        int e = errno;
        (void)!write(status[1], &e, sizeof e);
        _exit(127);
    }
    close(status[1]);
    int e = 0;
    ssize_t n;
    do { n = read(status[0], &e, sizeof e); } while (n < 0 && errno == EINTR);
    close(status[0]);
    if (n == sizeof e) {
        waitpid(pid, NULL, 0);
        errno = e;
        return -1;
    }
    return pid;
}

// ---- 9P relay -------------------------------------------------------------------------------

struct uvm_relay {
    pthread_t thread;
    int port, sock;
    int stop[2];                 // a byte on stop[1] ends the relay
    pthread_mutex_t lock;
    pthread_cond_t ended_cond;
    int ended;
};

// Writes all of buf; 0, or -1 when the other side is gone. A non-blocking fd that is full is
// waited for.
static int write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            if (poll(&p, 1, -1) < 0 && errno != EINTR) return -1;
            continue;
        }
        if (w <= 0) return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

// One thread, both directions. A port read returns at most one virtio buffer (a page), so the
// port is non-blocking and read until empty, and what was gathered goes to the socket in one
// write: the kernel's 9P reader then wakes once per message rather than once per page, and no
// poll() is needed between pages (under TCG every syscall counts).
static void *relay_main(void *arg) {
    uvm_relay *r = arg;
    enum { BUF = 1 << 20 };
    char *buf = malloc(BUF);
    int fl = fcntl(r->port, F_GETFL);
    if (fl >= 0) fcntl(r->port, F_SETFL, fl | O_NONBLOCK);
    struct pollfd p[3] = {
        { .fd = r->port, .events = POLLIN }, { .fd = r->sock, .events = POLLIN }, { .fd = r->stop[0], .events = POLLIN },
    };
    while (buf) {
        int n = poll(p, 3, -1);
        if (n < 0) { if (errno == EINTR) continue; break; }
        if (p[2].revents) break;
        if (p[0].revents & POLLIN) {
            size_t have = 0;
            int eof = 0;
            while (have < BUF) {
                ssize_t k = read(r->port, buf + have, BUF - have);
                if (k < 0 && errno == EINTR) continue;
                if (k < 0 && errno == EAGAIN) break;
                if (k <= 0) { eof = 1; break; }
                have += (size_t)k;
            }
            if (have && write_all(r->sock, buf, have) < 0) break;
            if (eof) break;  // the host went away
        } else if (p[0].revents & (POLLHUP | POLLERR)) {
            break;  // the host went away
        }
        if (p[1].revents & POLLIN) {
            ssize_t k = read(r->sock, buf, BUF);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) break;
            if (write_all(r->port, buf, (size_t)k) < 0) break;
        } else if (p[1].revents & (POLLHUP | POLLERR)) {
            break;  // the kernel closed its end: the mount is gone
        }
    }
    free(buf);
    close(r->port);
    close(r->sock);
    pthread_mutex_lock(&r->lock);
    r->ended = 1;
    pthread_cond_broadcast(&r->ended_cond);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

uvm_relay *uvm_relay_start(int port_fd, int sock_fd) {
    uvm_relay *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->port = port_fd;
    r->sock = sock_fd;
    if (pipe2(r->stop, O_CLOEXEC) < 0) { free(r); return NULL; }
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->ended_cond, NULL);
    int e = pthread_create(&r->thread, NULL, relay_main, r);
    if (e) {
        close(r->stop[0]); close(r->stop[1]);
        free(r);
        errno = e;
        return NULL;
    }
    return r;
}

int uvm_relay_finish(uvm_relay *r, int timeout_ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&r->lock);
    while (!r->ended) {
        if (pthread_cond_timedwait(&r->ended_cond, &r->lock, &deadline) == ETIMEDOUT) break;
    }
    int by_itself = r->ended;
    pthread_mutex_unlock(&r->lock);
    if (!by_itself) {
        char b = 1;
        (void)!write(r->stop[1], &b, 1);
    }
    pthread_join(r->thread, NULL);
    close(r->stop[0]);
    close(r->stop[1]);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->ended_cond);
    free(r);
    return by_itself;
}

// ---- PID 1, before Swift starts -----------------------------------------------------------

// libdispatch's Linux thread-pool monitor reads /proc/TID/stat of its workers from its first
// tick on, and crashes the process ("registered worker exited prematurely", a SIGILL) when it
// cannot open it. As PID 1 of a bare initramfs we mount /proc ourselves, and Swift's async main
// runs on a dispatch worker: mounting it in main() raced with that tick and lost under load
// (a kernel panic at boot, now and then). A constructor runs before any dispatch thread exists.
__attribute__((constructor)) static void uvm_pid1_mount_proc_early(void) {
    if (getpid() != 1 || access("/proc/self/stat", F_OK) == 0) return;
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

#include <sys/swap.h>
int uvm_swapon(const char *path) {
    return swapon(path, SWAP_FLAG_DISCARD);
}

#include <linux/fs.h>
int uvm_fitrim(const char *mountpoint, uint64_t *trimmed) {
    int fd = open(mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct fstrim_range range = { .start = 0, .len = UINT64_MAX, .minlen = 0 };
    int rc = ioctl(fd, FITRIM, &range);
    int saved = errno;
    close(fd);
    if (rc < 0) { errno = saved; return -1; }
    *trimmed = range.len;
    return 0;
}

int uvm_sigrtmin(void) { return SIGRTMIN; }

int uvm_memfd_create(const char *name, unsigned flags) { return (int)syscall(SYS_memfd_create, name, flags); }
