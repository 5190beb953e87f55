#pragma once
// Guest-side process plumbing for uvm-init. Everything here runs between fork and exec of a
// multi-threaded process, where only async-signal-safe calls are allowed: that is why it is C.
#include <stdint.h>
#include <sys/types.h>

/// What uvm_spawn starts. Pointers must stay valid for the duration of the call.
typedef struct uvm_spawn_args {
    char *const *argv;        // argv[0] is looked up in `path_env` unless it contains '/'
    char *const *envp;
    const char *path_env;     // PATH used for the lookup (the request's, not the agent's)
    const char *cwd;          // working directory inside the instance; NULL = "/"
    const char *fallback_cwd; // where to start when chdir(cwd) fails; NULL = fail instead
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    int ngroups;
    int stdin_fd, stdout_fd, stderr_fd;  // child ends, dup2'ed to 0, 1, 2
    int tty;                  // 1: stdin_fd is a pty slave that becomes the controlling terminal
    pid_t instance_pid;       // join this process's cgroup/mnt/uts/pid namespaces and root; 0 = stay
    int cgroup_procs_fd;      // cgroup.procs of the cgroup to join before that; -1 = stay
} uvm_spawn_args;

/// Starts a process; returns its pid (a child of the caller, even when it lives in another pid
/// namespace) or -1 with *err_errno and *err_stage (a short static string) set.
/// The caller must reap every child with waitpid(-1): the short-lived helper process is reaped
/// there too (its pid is returned through *helper_pid so it can be ignored), and so is a final
/// process that failed before exec (its pid in *failed_pid, 0 if there was none).
pid_t uvm_spawn(const uvm_spawn_args *args, pid_t *helper_pid, pid_t *failed_pid, int *err_errno, const char **err_stage);

/// Starts a distro instance: a process that is PID 1 of new mount, pid and uts namespaces, whose
/// root is the file system the caller mounted at `mountpoint` (a private mount: the new namespace
/// gets a copy of it, moved onto /, and the caller detaches its own once this returns), with
/// /proc, /sys, /dev, /dev/pts, /dev/shm and /run mounted. It reaps orphans until SIGTERM, then
/// terminates everything in the instance. The shares appear at `shares_at` (absolute, inside the
/// instance). With `cgroup_dir` (an existing cgroup v2 directory), the instance gets it as the
/// root of a cgroup namespace of its own, mounted at /sys/fs/cgroup, with its init in
/// init.scope below it. With `init_path`, that program (the distro's systemd) is exec'd as the
/// instance's PID 1 instead of the reaper loop. Returns its pid or -1 with *err_errno/*err_stage.
pid_t uvm_start_instance(const char *mountpoint,
                         const char *hostname, const char *shares_at, const char *cgroup_dir,
                         const char *init_path, int *err_errno, const char **err_stage);

/// Where the agent mounts shares; instances see this tree at /mnt/host (slave propagation, so a
/// share mounted or unmounted later appears or goes in every running instance too).
#define UVM_SHARES_DIR "/run/uvm/host"

/// Starts a thread relaying bytes between a virtio-serial port and a socket (the kernel's 9P
/// trans=fd end): the port has no write_iter, so the kernel cannot use it directly. The thread
/// owns both descriptors and closes them when either side ends or uvm_relay_stop is called.
/// Returns a handle, or NULL with errno.
typedef struct uvm_relay uvm_relay;
uvm_relay *uvm_relay_start(int port_fd, int sock_fd);
/// Waits up to timeout_ms for the relay to end by itself (the kernel let go of its socket);
/// then stops it. Frees the handle. Returns 1 if it had ended by itself, 0 if it was stopped.
int uvm_relay_finish(uvm_relay *relay, int timeout_ms);

/// Waits until the host side of a virtio-serial port is connected (the port reports POLLHUP
/// until then, and reads would return EOF). Returns 0, or -1 on timeout (timeout_ms < 0: none).
int uvm_wait_port_connected(int fd, int timeout_ms);
/// 1 when reading `fd` would not block (data waits in it, or its writers are gone and EOF waits),
/// else 0. Does not read.
int uvm_readable_now(int fd);

/// PID 1 plumbing: mount a file system, ignoring EBUSY (already mounted). Returns 0 or errno.
int uvm_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data);

/// Brings a network interface up (IFF_UP). Returns 0 or errno.
int uvm_if_up(const char *name);

/// Gives interface `name` the IPv4 address `addr` with `prefix` bits, brings it up, and when
/// `gateway` is not NULL adds the default route through it. Returns 0 or errno; *stage says which step failed.
int uvm_if_configure_ipv4(const char *name, const char *addr, int prefix, const char *gateway, const char **stage);

/// Connects to `port` on the guest's loopback: 127.0.0.1, then ::1, waiting at most `wait_ms`
/// for each handshake (on loopback it takes microseconds unless the listener's backlog is full).
/// The socket comes back non-blocking, close-on-exec, with TCP_NODELAY. Returns the fd, or -1
/// with errno: ETIMEDOUT when a handshake was still pending, else the last attempt's error.
int uvm_connect_loopback(unsigned short port, int wait_ms);

/// A listening TCP socket as NETLINK_SOCK_DIAG reports it.
typedef struct uvm_listener {
    int family;                 // AF_INET or AF_INET6
    unsigned short port;        // host byte order
    unsigned char addr[16];     // IPv4 in the first 4 bytes
    unsigned long long inode;
} uvm_listener;

/// The TCP sockets in state LISTEN (IPv4 and IPv6), asked of the kernel with NETLINK_SOCK_DIAG:
/// the kernel filters by state, so the cost does not grow with established or TIME_WAIT
/// connections as reading /proc/net/tcp does. Fills at most `max`; returns how many there are,
/// or -1 with errno.
int uvm_tcp_listeners(uvm_listener *out, int max);

/// Syncs and powers the machine off. Does not return on success.
int uvm_poweroff(void);

/// ioctl(TIOCSWINSZ) for a pty master.
int uvm_set_winsize(int fd, unsigned short rows, unsigned short cols);

/// Opens a pty pair through `ptmx` (an instance's /dev/ptmx, reached through /proc/PID/root, so
/// the slave lives in that instance's devpts), master O_CLOEXEC|O_NONBLOCK, slave O_CLOEXEC.
/// Returns 0 or errno.
int uvm_openpty(const char *ptmx, int *master, int *slave, unsigned short rows, unsigned short cols);

/// SO_PEERCRED of a connected unix socket. Returns 0 or errno.
int uvm_peer_uid(int fd, uid_t *uid, pid_t *pid);

/// pipe2(O_CLOEXEC) (Glibc's Swift overlay does not export pipe2). Returns 0 or errno.
int uvm_pipe_cloexec(int fds[2]);

/// Starts `path` detached from the caller: its own session, stdin /dev/null, stdout and stderr
/// appended to `log_path`, and no other inherited descriptor (a long-lived daemon must not keep
/// the caller's pipes open). Returns the pid, or -1 with errno.
pid_t uvm_spawn_detached(const char *path, char *const argv[], const char *log_path);
/// As uvm_spawn_detached, with `keep_fd` passed on as the child's fd 3 (`uvm mount` learns through
/// it whether its background process mounted); -1 passes none (uvm_spawn_detached).
pid_t uvm_spawn_detached_fd3(const char *path, char *const argv[], const char *log_path, int keep_fd);

/// Starts `path` with `in`, `out` and `err` as its stdin, stdout and stderr (-1: /dev/null) and
/// no other descriptor of ours: uvmd's listening socket and its clients' connections are not
/// all close-on-exec (NIO accepts without it), and a child holding them would keep a dead
/// uvmd's socket accepting connections nobody answers. Returns the pid, or -1 with errno.
pid_t uvm_spawn_with_fds(const char *path, char *const argv[], int in, int out, int err);

/// `uvm-host`'s program on the host: `file` looked up in envp's PATH, run with `envp` in `cwd`
/// (the home directory when that fails), in a process group of its own (signals go to the group),
/// with `in`/`out`/`err` as its stdio and no other descriptor of ours. Returns the pid, or -1 with
/// errno (ENOENT: not found) once the exec itself failed.
pid_t uvm_spawn_host(const char *file, char *const argv[], char *const envp[], const char *cwd, const char *home,
                     int in, int out, int err);

/// O_DIRECT, which Glibc's Swift module leaves out (it needs _GNU_SOURCE).
static inline int uvm_o_direct(void) { return 040000; }

/// memfd_create(2), which Glibc's Swift module leaves out (tests: a stand-in for QEMU's guest RAM).
int uvm_memfd_create(const char *name, unsigned flags);

/// SIGRTMIN, a function call in glibc that Swift does not import.
int uvm_sigrtmin(void);

/// swapon(2) with discard: swap the guest frees goes back to the host's sparse file.
int uvm_swapon(const char *path);

/// FITRIM on the file system mounted at `mountpoint`: its free blocks are discarded; `trimmed`
/// gets the bytes the file system passed down. -1 with errno on failure.
int uvm_fitrim(const char *mountpoint, uint64_t *trimmed);
