#pragma once
// Interop (`uvm-host`): the guest command that runs a program on the host, and the agent's end
// of its per-session socket. The command hands its stdin/stdout/stderr to the agent
// (SCM_RIGHTS) with a request, then only waits: for the exit status, passing on the signals it
// gets. Wire format on the socket:
//   client -> agent: u32 length (big-endian) + JSON request, with fds 0, 1, 2 attached;
//                    then one u32 per signal the command received.
//   agent -> client: 'E' + i32 exit code + i32 signal (0: none)    the program's end
//                    'X' + u32 length + message                    refused or failed
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Largest request (argv and cwd as JSON) the agent reads.
#define UVM_INTEROP_MAX_REQUEST 65536

/// The command's side: connects to the abstract socket `name`, sends `json` and fds 0-2, then
/// relays signals until the answer. Returns the exit status to exit with; on a refusal or a
/// socket failure, prints to stderr and returns 126 (refused) or 125 (no session socket).
int uvm_interop_client(const char *name, const char *json, size_t len);

/// The agent's side: a listening abstract socket named `name` (SOCK_CLOEXEC), or -1 and errno.
int uvm_interop_listen(const char *name);

/// accept4(SOCK_CLOEXEC) on the listening socket; -1 and errno (EINVAL once it is shut down).
int uvm_interop_accept(int listener);

/// Receives a request on an accepted connection, waiting `timeout_ms` at most: its JSON into
/// `buf` (NUL-terminated; returns the length) and the three descriptors into `fds` (close-on-exec).
/// The peer's pid (SO_PEERCRED) into `peer`. -1 and errno on failure (EMSGSIZE: too large,
/// EPROTO: no descriptors or a malformed header).
int uvm_interop_receive(int conn, char *buf, size_t cap, int fds[3], pid_t *peer, int timeout_ms);

/// Writes the end ('E') or a refusal ('X') to the command. -1 and errno on failure.
int uvm_interop_send_exit(int conn, int32_t code, int32_t sig);
int uvm_interop_send_refusal(int conn, const char *message);

/// The parent pid of `pid` from /proc/PID/stat, or -1.
pid_t uvm_parent_pid(pid_t pid);
