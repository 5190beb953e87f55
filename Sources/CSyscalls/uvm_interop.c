#define _GNU_SOURCE
#include "uvm_interop.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static socklen_t abstract_address(const char *name, struct sockaddr_un *a) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n > sizeof a->sun_path - 1) n = sizeof a->sun_path - 1;
    memcpy(a->sun_path + 1, name, n);  // sun_path[0] = 0: the abstract namespace
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n) {
    char *c = p;
    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

int uvm_interop_client(const char *name, const char *json, size_t len) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a;
    socklen_t alen = abstract_address(name, &a);
    if (s < 0 || connect(s, (struct sockaddr *)&a, alen) < 0) {
        fprintf(stderr, "uvm-host: this session's interop socket is gone (%s): run uvm-host from a `uvm exec` or `uvm shell` session that is still running\n", strerror(errno));
        return 125;
    }
    // The signals we pass on are taken through a signalfd, so they cannot end us first.
    sigset_t relayed;
    sigemptyset(&relayed);
    int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH };
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaddset(&relayed, sigs[i]);
    sigprocmask(SIG_BLOCK, &relayed, NULL);
    int sfd = signalfd(-1, &relayed, SFD_CLOEXEC);

    uint32_t be = htonl((uint32_t)len);
    char *msg = malloc(4 + len);
    if (!msg) return 125;
    memcpy(msg, &be, 4);
    memcpy(msg + 4, json, len);
    int fds[3] = { 0, 1, 2 };
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = { .iov_base = msg, .iov_len = 4 + len };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    ssize_t sent;
    do { sent = sendmsg(s, &m, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    if (sent > 0 && (size_t)sent < 4 + len) sent = write_all(s, msg + sent, 4 + len - (size_t)sent) == 0 ? (ssize_t)(4 + len) : -1;
    free(msg);
    if (sent < 0) {
        fprintf(stderr, "uvm-host: cannot send the request: %s\n", strerror(errno));
        return 125;
    }
    for (;;) {
        struct pollfd p[2] = { { .fd = s, .events = POLLIN }, { .fd = sfd, .events = POLLIN } };
        if (poll(p, sfd >= 0 ? 2 : 1, -1) < 0) {
            if (errno == EINTR) continue;
            return 125;
        }
        if (sfd >= 0 && (p[1].revents & POLLIN)) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == sizeof si) {
                uint32_t n = htonl(si.ssi_signo);
                (void)write_all(s, &n, 4);
            }
        }
        if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            char kind;
            if (read_all(s, &kind, 1) < 0) {
                fprintf(stderr, "uvm-host: the session ended before the host program did\n");
                return 125;
            }
            if (kind == 'E') {
                int32_t v[2];
                if (read_all(s, v, sizeof v) < 0) return 125;
                int32_t code = (int32_t)ntohl((uint32_t)v[0]), sig = (int32_t)ntohl((uint32_t)v[1]);
                return sig ? 128 + sig : code;
            }
            uint32_t n;
            if (kind != 'X' || read_all(s, &n, 4) < 0) return 125;
            n = ntohl(n);
            if (n > 65536) return 125;
            char *text = malloc(n + 1);
            if (!text || read_all(s, text, n) < 0) return 125;
            text[n] = 0;
            fprintf(stderr, "uvm-host: %s\n", text);
            free(text);
            return 126;
        }
    }
}

int uvm_interop_listen(const char *name) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_un a;
    socklen_t alen = abstract_address(name, &a);
    if (bind(s, (struct sockaddr *)&a, alen) < 0 || listen(s, 16) < 0) {
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
    return s;
}

int uvm_interop_accept(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC);
}

int uvm_interop_receive(int conn, char *buf, size_t cap, int fds[3], pid_t *peer, int timeout_ms) {
    struct ucred cred;
    socklen_t clen = sizeof cred;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) return -1;
    *peer = cred.pid;
    struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    uint32_t be;
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = { .iov_base = &be, .iov_len = 4 };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t r;
    do { r = recvmsg(conn, &m, MSG_CMSG_CLOEXEC | MSG_WAITALL); } while (r < 0 && errno == EINTR);
    int got = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *p = (int *)CMSG_DATA(c);
        for (int i = 0; i < n; i++) {
            if (got < 3) fds[got++] = p[i]; else close(p[i]);
        }
    }
    if (r != 4 || got != 3 || (m.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < got; i++) close(fds[i]);
        errno = r < 0 ? errno : EPROTO;
        return -1;
    }
    uint32_t len = ntohl(be);
    if (len >= cap) {
        for (int i = 0; i < 3; i++) close(fds[i]);
        errno = EMSGSIZE;
        return -1;
    }
    if (read_all(conn, buf, len) < 0) {
        int e = errno ? errno : EPROTO;
        for (int i = 0; i < 3; i++) close(fds[i]);
        errno = e;
        return -1;
    }
    buf[len] = 0;
    tv.tv_sec = 0;
    tv.tv_usec = 0;
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return (int)len;
}

int uvm_interop_send_exit(int conn, int32_t code, int32_t sig) {
    char b[9];
    b[0] = 'E';
    uint32_t c = htonl((uint32_t)code), s = htonl((uint32_t)sig);
    memcpy(b + 1, &c, 4);
    memcpy(b + 5, &s, 4);
    return write_all(conn, b, sizeof b);
}

int uvm_interop_send_refusal(int conn, const char *message) {
    size_t n = strlen(message);
    char h[5];
    h[0] = 'X';
    uint32_t be = htonl((uint32_t)n);
    memcpy(h + 1, &be, 4);
    if (write_all(conn, h, 5) < 0) return -1;
    return write_all(conn, message, n);
}

pid_t uvm_parent_pid(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    char *close_paren = strrchr(buf, ')');
    if (!close_paren) return -1;
    char state;
    int ppid;
    if (sscanf(close_paren + 1, " %c %d", &state, &ppid) != 2) return -1;
    return (pid_t)ppid;
}
