#define _GNU_SOURCE
#include "cshmring.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* One channel's control block in the shared memory; each index on a cache line of its own. */
struct ctl {
    uint32_t req_head;  /* guest: bytes of requests written */
    uint32_t pad0[15];
    uint32_t req_tail;  /* host: bytes of requests consumed */
    uint32_t pad1[15];
    uint32_t rep_head;  /* host: bytes of replies written */
    uint32_t pad2[15];
    uint32_t rep_tail;  /* guest: bytes of replies consumed */
    uint32_t pad3[7];
    uint32_t host_closed;
    uint32_t host_flags;  /* UVM_SHM_HOST_ZC: the 9P server reads and writes guest pages (Tzc) */
    uint32_t guest_polling;  /* guest: nonzero while a caller watches the reply ring itself */
};
_Static_assert(sizeof(struct ctl) <= UVM_SHM_CTL_STRIDE, "control block too big");

typedef struct {
    uvm_shm *shm;
    unsigned index;
    int doorbell;   /* the guest rings it (QEMU writes it on a Doorbell register write) */
    int interrupt;  /* we write it; QEMU raises the channel's MSI-X vector */
    int stop;       /* wakes the pump to end it */
    int sock;       /* the 9P server's end; -1 when detached */
    int running;    /* a pump thread exists and is not joined yet */
    pthread_t thread;
} channel;

struct uvm_shm {
    int memfd;
    uint8_t *base;
    size_t size;
    uint32_t ring;
    unsigned nchan;
    int listener;
    int stop;
    int qemu;
    atomic_int qemu_pid;  /* SO_PEERCRED of QEMU's connection, 0 before it */
    pthread_t server;
    atomic_int connected;
    pthread_mutex_t lock;
    channel chan[UVM_SHM_MAX_CHANNELS];
};

static void fail(char *err, size_t len, const char *fmt, ...) {
    if (!err || !len) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err, len, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < len) snprintf(err + n, len - n, ": %s", strerror(errno));
}

static struct ctl *ctl_of(uvm_shm *s, unsigned i) {
    return (struct ctl *)(s->base + UVM_SHM_CTL + (size_t)UVM_SHM_CTL_STRIDE * i);
}

static uint8_t *rings_of(uvm_shm *s, unsigned i) {
    return s->base + UVM_SHM_DATA + (size_t)2 * s->ring * i;
}

static uint32_t load(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void store(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static void kick(int efd) {
    uint64_t one = 1;
    while (write(efd, &one, sizeof one) < 0 && errno == EINTR) {}
}

static void drain(int efd) {
    uint64_t v;
    while (read(efd, &v, sizeof v) > 0) {}
}

/* Moves requests from the ring to the server and replies from the server to the ring until the
 * channel is detached, the server closes its end, or the guest breaks the ring protocol. Our own
 * indices live here, never re-read from the shared memory the guest can write. */
static void *pump(void *arg) {
    channel *c = arg;
    uvm_shm *s = c->shm;
    struct ctl *ctl = ctl_of(s, c->index);
    uint8_t *req = rings_of(s, c->index), *rep = req + s->ring;
    const uint32_t R = s->ring;
    uint32_t req_tail = 0, rep_head = 0;
    const char *why = NULL;

    for (;;) {
        int want_out = 0, replied = 0;
        uint32_t avail = load(&ctl->req_head) - req_tail;
        if (avail > R) { why = "the guest's request index is out of range"; break; }
        while (avail > 0) {
            uint32_t off = req_tail & (R - 1), n = avail < R - off ? avail : R - off;
            ssize_t w = send(c->sock, req + off, n, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) { want_out = 1; break; }
                why = "the 9P server's socket failed";
                goto out;
            }
            req_tail += (uint32_t)w;
            avail -= (uint32_t)w;
            store(&ctl->req_tail, req_tail);
        }
        uint32_t used = rep_head - load(&ctl->rep_tail);
        if (used > R) { why = "the guest's reply index is out of range"; break; }
        uint32_t space = R - used;
        while (space > 0) {
            uint32_t off = rep_head & (R - 1), n = space < R - off ? space : R - off;
            ssize_t r = recv(c->sock, rep + off, n, MSG_DONTWAIT);
            if (r == 0) goto out;  /* the server ended the session */
            if (r < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) break;
                why = "the 9P server's socket failed";
                goto out;
            }
            rep_head += (uint32_t)r;
            space -= (uint32_t)r;
            store(&ctl->rep_head, rep_head);
            replied = 1;
        }
        /* A guest caller watching the ring takes the replies itself (and any that come after it
         * stops watching: it looks once more). The flag is the guest's: a wrong one only leaves
         * the guest's own callers waiting. */
        if (replied) {
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (load(&ctl->guest_polling) == 0) kick(c->interrupt);
        }
        struct pollfd p[3] = {
            {.fd = c->doorbell, .events = POLLIN},
            {.fd = c->stop, .events = POLLIN},
            {.fd = c->sock, .events = (short)((space > 0 ? POLLIN : 0) | (want_out ? POLLOUT : 0))},
        };
        /* A full reply ring empties in the guest's interrupt handler, which does not ring back:
         * look again soon. */
        int n = poll(p, 3, space == 0 ? 1 : -1);
        if (n < 0 && errno != EINTR) { why = "poll failed"; break; }
        if (p[1].revents) break;
        if (p[0].revents & POLLIN) drain(c->doorbell);
    }
out:
    if (why) fprintf(stderr, "uvmd: 9P shared-memory channel %u closed: %s\n", c->index, why);
    /* The guest's requests still waiting fail instead of hanging. */
    store(&ctl->host_closed, 1);
    kick(c->interrupt);
    shutdown(c->sock, SHUT_RDWR);
    return NULL;
}

static int send_msg(int sock, int64_t value, int fd) {
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &value, .iov_len = sizeof value};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    memset(control, 0, sizeof control);
    if (fd >= 0) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof value) return 0;
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
}

/* The ivshmem server protocol (QEMU's docs/specs/ivshmem-spec.rst): QEMU is peer 1; peer 0 is us,
 * a peer that never connects. Its interrupt vectors are our doorbells, QEMU's own are the
 * guest's interrupts. */
static int greet(uvm_shm *s, int sock) {
    if (send_msg(sock, 0, -1) || send_msg(sock, 1, -1) || send_msg(sock, -1, s->memfd)) return -1;
    for (unsigned i = 0; i < s->nchan; i++)
        if (send_msg(sock, 0, s->chan[i].doorbell)) return -1;
    for (unsigned i = 0; i < s->nchan; i++)
        if (send_msg(sock, 1, s->chan[i].interrupt)) return -1;
    return 0;
}

static void *serve(void *arg) {
    uvm_shm *s = arg;
    for (;;) {
        struct pollfd p[2] = {{.fd = s->listener, .events = POLLIN}, {.fd = s->stop, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (p[1].revents) break;
        int c = accept4(s->listener, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            /* Out of descriptors the connection stays queued and poll returns at once: wait (for
             * the stop fd at most 100 ms) rather than spin at 100% of a core. */
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) poll(&p[1], 1, 100);
            continue;
        }
        /* One VM per region: a second connection gets nothing. */
        if (atomic_load(&s->connected) || greet(s, c) != 0) {
            close(c);
            continue;
        }
        s->qemu = c;  /* kept open: QEMU treats a closed server as gone */
        /* Its pid leads to guest RAM (/proc/PID/fd) for zero copy. The socket is 0600: only our
         * own user connects, as QEMU does in qemu:///session. */
        struct ucred cred;
        socklen_t clen = sizeof cred;
        if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0) atomic_store(&s->qemu_pid, cred.pid);
        atomic_store(&s->connected, 1);
    }
    return NULL;
}

uvm_shm *uvm_shm_create(const char *socket_path, unsigned channels, uint32_t ring_size, char *err, size_t errlen) {
    if (channels == 0 || channels > UVM_SHM_MAX_CHANNELS || ring_size < 4096 || (ring_size & (ring_size - 1))) {
        errno = EINVAL;
        fail(err, errlen, "bad shared-memory layout (%u channels of %u bytes)", channels, ring_size);
        return NULL;
    }
    uvm_shm *s = calloc(1, sizeof *s);
    if (!s) { fail(err, errlen, "calloc"); return NULL; }
    s->memfd = s->listener = s->stop = s->qemu = -1;
    for (unsigned i = 0; i < UVM_SHM_MAX_CHANNELS; i++)
        s->chan[i] = (channel){.shm = s, .index = i, .doorbell = -1, .interrupt = -1, .stop = -1, .sock = -1};
    pthread_mutex_init(&s->lock, NULL);
    s->ring = ring_size;
    s->nchan = channels;
    /* PCI BARs are a power of two in size. */
    size_t need = UVM_SHM_DATA + (size_t)2 * ring_size * channels;
    s->size = 1u << 20;
    while (s->size < need) s->size <<= 1;

    s->memfd = memfd_create("uvm-9p", MFD_CLOEXEC);
    if (s->memfd < 0 || ftruncate(s->memfd, (off_t)s->size) != 0) { fail(err, errlen, "shared memory"); goto bad; }
    s->base = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->memfd, 0);
    if (s->base == MAP_FAILED) { s->base = NULL; fail(err, errlen, "mmap"); goto bad; }
    uint32_t *hdr = (uint32_t *)s->base;
    hdr[0] = UVM_SHM_MAGIC;
    hdr[1] = UVM_SHM_LAYOUT;
    hdr[2] = channels;
    hdr[3] = ring_size;
    for (unsigned i = 0; i < channels; i++) {
        channel *c = &s->chan[i];
        c->doorbell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        c->interrupt = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c->doorbell < 0 || c->interrupt < 0) { fail(err, errlen, "eventfd"); goto bad; }
        store(&ctl_of(s, i)->host_closed, 1);  /* nothing to mount until attached */
    }
    s->stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->stop < 0) { fail(err, errlen, "eventfd"); goto bad; }

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        fail(err, errlen, "%s", socket_path);
        goto bad;
    }
    strcpy(addr.sun_path, socket_path);
    unlink(socket_path);
    s->listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s->listener < 0 || bind(s->listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        chmod(socket_path, 0600) != 0 || listen(s->listener, 4) != 0) {
        fail(err, errlen, "cannot listen on %s", socket_path);
        goto bad;
    }
    if ((errno = pthread_create(&s->server, NULL, serve, s)) != 0) { fail(err, errlen, "pthread_create"); goto bad; }
    return s;
bad:
    for (unsigned i = 0; i < UVM_SHM_MAX_CHANNELS; i++) {
        if (s->chan[i].doorbell >= 0) close(s->chan[i].doorbell);
        if (s->chan[i].interrupt >= 0) close(s->chan[i].interrupt);
    }
    if (s->listener >= 0) close(s->listener);
    if (s->stop >= 0) close(s->stop);
    if (s->base) munmap(s->base, s->size);
    if (s->memfd >= 0) close(s->memfd);
    free(s);
    return NULL;
}

static void stop_pump(channel *c) {
    if (!c->running) return;
    kick(c->stop);
    pthread_join(c->thread, NULL);
    c->running = 0;
    close(c->stop);
    c->stop = -1;
    close(c->sock);
    c->sock = -1;
}

int uvm_shm_attach(uvm_shm *s, unsigned i, int fd) { return uvm_shm_attach_flags(s, i, fd, 0); }

int uvm_shm_attach_flags(uvm_shm *s, unsigned i, int fd, uint32_t host_flags) {
    if (i >= s->nchan) { errno = EINVAL; return -1; }
    pthread_mutex_lock(&s->lock);
    channel *c = &s->chan[i];
    stop_pump(c);
    struct ctl *ctl = ctl_of(s, i);
    store(&ctl->req_head, 0);
    store(&ctl->req_tail, 0);
    store(&ctl->rep_head, 0);
    store(&ctl->rep_tail, 0);
    drain(c->doorbell);
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    c->stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->stop < 0) { pthread_mutex_unlock(&s->lock); return -1; }
    c->sock = fd;
    /* Read by the guest when it mounts, which it does only after this returns. */
    store(&ctl->host_flags, host_flags);
    store(&ctl->host_closed, 0);
    if ((errno = pthread_create(&c->thread, NULL, pump, c)) != 0) {
        store(&ctl->host_closed, 1);
        close(c->stop);
        c->stop = c->sock = -1;
        pthread_mutex_unlock(&s->lock);
        return -1;
    }
    c->running = 1;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void uvm_shm_detach(uvm_shm *s, unsigned i) {
    if (i >= s->nchan) return;
    pthread_mutex_lock(&s->lock);
    stop_pump(&s->chan[i]);
    pthread_mutex_unlock(&s->lock);
}

int uvm_shm_connected(uvm_shm *s) { return atomic_load(&s->connected); }

int uvm_shm_qemu_pid(uvm_shm *s) { return atomic_load(&s->qemu_pid); }

void uvm_shm_destroy(uvm_shm *s) {
    if (!s) return;
    for (unsigned i = 0; i < s->nchan; i++) uvm_shm_detach(s, i);
    kick(s->stop);
    pthread_join(s->server, NULL);
    close(s->stop);
    close(s->listener);
    if (s->qemu >= 0) close(s->qemu);
    for (unsigned i = 0; i < s->nchan; i++) {
        close(s->chan[i].doorbell);
        close(s->chan[i].interrupt);
    }
    munmap(s->base, s->size);
    close(s->memfd);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

void *uvm_shm_region(uvm_shm *s, size_t *size) {
    if (size) *size = s->size;
    return s->base;
}

int uvm_shm_doorbell_fd(uvm_shm *s, unsigned i) { return i < s->nchan ? s->chan[i].doorbell : -1; }
int uvm_shm_interrupt_fd(uvm_shm *s, unsigned i) { return i < s->nchan ? s->chan[i].interrupt : -1; }
