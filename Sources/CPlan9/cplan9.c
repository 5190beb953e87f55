#define _GNU_SOURCE
#include "cplan9.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <linux/openat2.h>

const int cp9_O_PATH = O_PATH;
const int cp9_O_NOFOLLOW = O_NOFOLLOW;
const int cp9_O_DIRECTORY = O_DIRECTORY;
const int cp9_O_DIRECT = O_DIRECT;
const int cp9_O_NOATIME = O_NOATIME;
const int cp9_O_LARGEFILE = O_LARGEFILE;
const int cp9_O_TMPFILE = O_TMPFILE;
const int cp9_AT_EMPTY_PATH = AT_EMPTY_PATH;
const int cp9_AT_SYMLINK_NOFOLLOW = AT_SYMLINK_NOFOLLOW;
const int cp9_AT_SYMLINK_FOLLOW = AT_SYMLINK_FOLLOW;
const int cp9_AT_REMOVEDIR = AT_REMOVEDIR;

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

// 1 = available, 0 = ENOSYS seen, -1 = not probed yet. A benign race: every thread computes the same.
static int openat2_state = -1;

int cp9_have_openat2(void) {
    if (openat2_state < 0) {
        struct open_how how = { .flags = O_PATH | O_CLOEXEC, .resolve = RESOLVE_BENEATH };
        long fd = syscall(SYS_openat2, AT_FDCWD, ".", &how, sizeof how);
        if (fd >= 0) close((int)fd);
        __atomic_store_n(&openat2_state, (fd < 0 && errno == ENOSYS) ? 0 : 1, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&openat2_state, __ATOMIC_RELAXED);
}

int cp9_open_beneath(int dirfd, const char *name, int flags, unsigned mode) {
    if (name[0] == '\0' || strchr(name, '/') != NULL || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        errno = EINVAL;
        return -1;
    }
    flags |= O_NOFOLLOW | O_CLOEXEC;
    if (cp9_have_openat2()) {
        struct open_how how = {
            .flags = (uint64_t)flags,
            .mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        long fd;
        do { fd = syscall(SYS_openat2, dirfd, name, &how, sizeof how); } while (fd < 0 && errno == EAGAIN);
        return (int)fd;
    }
    // One component with O_NOFOLLOW cannot traverse anything: the same guarantee for this use.
    return openat(dirfd, name, flags, mode);
}

// A relative path of several components beneath `dirfd`, following no symlink and never leaving
// `dirfd`'s tree. Without openat2 it fails with ENOSYS: callers have a slower fallback.
int cp9_open_beneath_path(int dirfd, const char *path, int flags) {
    if (!cp9_have_openat2()) {
        errno = ENOSYS;
        return -1;
    }
    struct open_how how = {
        .flags = (uint64_t)(flags | O_NOFOLLOW | O_CLOEXEC),
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    long fd;
    do { fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how); } while (fd < 0 && errno == EAGAIN);
    return (int)fd;
}

// accept4 needs _GNU_SOURCE, which Swift's Glibc module does not see.
int cp9_accept(int fd) {
    return accept4(fd, NULL, NULL, SOCK_CLOEXEC);
}

// Starts write-out of the range's dirty pages without waiting for it (WriteBehind.swift).
int cp9_write_behind(int fd, int64_t offset, int64_t count) {
    return sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE);
}

ssize_t cp9_getdents64(int fd, void *buf, size_t count) {
    return syscall(SYS_getdents64, fd, buf, count);
}

static void from_stat(const struct stat *st, struct cp9_stat *out) {
    memset(out, 0, sizeof *out);
    out->dev = st->st_dev; out->ino = st->st_ino; out->nlink = st->st_nlink; out->rdev = st->st_rdev;
    out->size = (uint64_t)st->st_size; out->blksize = (uint64_t)st->st_blksize; out->blocks = (uint64_t)st->st_blocks;
    out->mode = st->st_mode; out->uid = st->st_uid; out->gid = st->st_gid;
    out->atime_sec = st->st_atim.tv_sec; out->atime_nsec = (uint32_t)st->st_atim.tv_nsec;
    out->mtime_sec = st->st_mtim.tv_sec; out->mtime_nsec = (uint32_t)st->st_mtim.tv_nsec;
    out->ctime_sec = st->st_ctim.tv_sec; out->ctime_nsec = (uint32_t)st->st_ctim.tv_nsec;
}

int cp9_stat(int fd, const char *path, struct cp9_stat *out) {
    int flags = AT_SYMLINK_NOFOLLOW | (path[0] == '\0' ? AT_EMPTY_PATH : 0);
#ifdef STATX_BASIC_STATS
    struct statx sx;
    if (statx(fd, path, flags | AT_STATX_SYNC_AS_STAT, STATX_BASIC_STATS | STATX_BTIME, &sx) == 0) {
        memset(out, 0, sizeof *out);
        out->dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
        out->ino = sx.stx_ino; out->nlink = sx.stx_nlink;
        out->rdev = makedev(sx.stx_rdev_major, sx.stx_rdev_minor);
        out->size = sx.stx_size; out->blksize = sx.stx_blksize; out->blocks = sx.stx_blocks;
        out->mode = sx.stx_mode; out->uid = sx.stx_uid; out->gid = sx.stx_gid;
        out->atime_sec = sx.stx_atime.tv_sec; out->atime_nsec = sx.stx_atime.tv_nsec;
        out->mtime_sec = sx.stx_mtime.tv_sec; out->mtime_nsec = sx.stx_mtime.tv_nsec;
        out->ctime_sec = sx.stx_ctime.tv_sec; out->ctime_nsec = sx.stx_ctime.tv_nsec;
        if (sx.stx_mask & STATX_BTIME) {
            out->has_btime = 1;
            out->btime_sec = sx.stx_btime.tv_sec; out->btime_nsec = sx.stx_btime.tv_nsec;
        }
        return 0;
    }
    if (errno != ENOSYS) return -1;
#endif
    struct stat st;
    if (fstatat(fd, path, &st, flags) != 0) return -1;
    from_stat(&st, out);
    return 0;
}

int cp9_fstatfs(int fd, struct cp9_statfs *out) {
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return -1;
    out->type = (uint64_t)s.f_type; out->bsize = (uint64_t)s.f_bsize;
    out->blocks = s.f_blocks; out->bfree = s.f_bfree; out->bavail = s.f_bavail;
    out->files = s.f_files; out->ffree = s.f_ffree;
    uint32_t lo, hi;
    memcpy(&lo, &s.f_fsid.__val[0], 4);
    memcpy(&hi, &s.f_fsid.__val[1], 4);
    out->fsid = (uint64_t)lo | ((uint64_t)hi << 32);
    out->namelen = (uint64_t)s.f_namelen;
    return 0;
}

ssize_t cp9_getxattr(const char *path, const char *name, void *value, size_t size) {
    return getxattr(path, name, value, size);
}
int cp9_setxattr(const char *path, const char *name, const void *value, size_t size, int flags) {
    return setxattr(path, name, value, size, flags);
}
ssize_t cp9_listxattr(const char *path, char *list, size_t size) {
    return listxattr(path, list, size);
}
int cp9_removexattr(const char *path, const char *name) {
    return removexattr(path, name);
}

int cp9_ofd_lock(int fd, int cmd, int *type, int64_t *start, int64_t *len, int32_t *pid) {
    static const short types[3] = { F_RDLCK, F_WRLCK, F_UNLCK };
    if (*type < 0 || *type > 2) { errno = EINVAL; return -1; }
    struct flock fl = { .l_type = types[*type], .l_whence = SEEK_SET, .l_start = *start, .l_len = *len, .l_pid = 0 };
    if (fcntl(fd, cmd == 0 ? F_OFD_SETLK : F_OFD_GETLK, &fl) != 0) return -1;
    *type = fl.l_type == F_RDLCK ? 0 : fl.l_type == F_WRLCK ? 1 : 2;
    *start = fl.l_start; *len = fl.l_len; *pid = fl.l_pid;
    return 0;
}

uint64_t cp9_makedev(uint32_t ma, uint32_t mi) { return makedev(ma, mi); }
uint32_t cp9_major(uint64_t dev) { return major(dev); }
uint32_t cp9_minor(uint64_t dev) { return minor(dev); }

int cp9_set_thread_fs_identity(uint32_t uid, uint32_t gid, const uint32_t *groups, int ngroups) {
    gid_t list[64];
    if (ngroups < 0 || ngroups > 64) { errno = EINVAL; return -1; }
    for (int i = 0; i < ngroups; i++) list[i] = groups[i];
    if (syscall(SYS_setgroups, ngroups, list) != 0) return -1;
    syscall(SYS_setfsgid, gid);
    syscall(SYS_setfsuid, uid);
    /* setfsuid/setfsgid return the previous value, never an error: ask again to check. */
    if ((uint32_t)syscall(SYS_setfsgid, (gid_t)-1) != gid || (uint32_t)syscall(SYS_setfsuid, (uid_t)-1) != uid) {
        errno = EPERM;
        return -1;
    }
    return 0;
}
