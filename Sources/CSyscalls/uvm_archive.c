#define _GNU_SOURCE
#include "uvm_archive.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

const int uvm_ar_O_NOFOLLOW = O_NOFOLLOW;
const int uvm_ar_O_DIRECTORY = O_DIRECTORY;
const int uvm_ar_O_PATH = O_PATH;
const int uvm_ar_O_CLOEXEC = O_CLOEXEC;
const int uvm_ar_AT_SYMLINK_NOFOLLOW = AT_SYMLINK_NOFOLLOW;
const int uvm_ar_AT_REMOVEDIR = AT_REMOVEDIR;
const int uvm_ar_SEEK_DATA = SEEK_DATA;
const int uvm_ar_SEEK_HOLE = SEEK_HOLE;
const long uvm_ar_UTIME_NOW = UTIME_NOW;
const long uvm_ar_UTIME_OMIT = UTIME_OMIT;

uint64_t uvm_ar_makedev(uint32_t major, uint32_t minor) { return makedev(major, minor); }
uint32_t uvm_ar_major(uint64_t dev) { return major(dev); }
uint32_t uvm_ar_minor(uint64_t dev) { return minor(dev); }

int uvm_ar_openat(int dirfd, const char *name, int flags, unsigned mode) { return openat(dirfd, name, flags, (mode_t)mode); }
int uvm_ar_open_in_root(int rootfd, const char *path, int flags) {
    // RESOLVE_IN_ROOT: "..", absolute paths and absolute symlinks all stay beneath rootfd, as
    // if chrooted there; magic links (/proc/PID/fd/N) could leave it and are refused.
    struct open_how how = { .flags = (uint64_t)(flags | O_CLOEXEC), .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS };
    return (int)syscall(SYS_openat2, rootfd, path, &how, sizeof how);
}
int uvm_ar_mknodat(int dirfd, const char *name, unsigned mode, uint64_t dev) { return mknodat(dirfd, name, (mode_t)mode, (dev_t)dev); }

const char *uvm_ar_readdir_name(void *dir) {
    errno = 0;
    struct dirent *d = readdir((DIR *)dir);
    return d ? d->d_name : NULL;
}

ssize_t uvm_ar_llistxattr(const char *path, char *list, size_t size) { return llistxattr(path, list, size); }
ssize_t uvm_ar_lgetxattr(const char *path, const char *name, void *value, size_t size) { return lgetxattr(path, name, value, size); }
int uvm_ar_lsetxattr(const char *path, const char *name, const void *value, size_t size) { return lsetxattr(path, name, value, size, 0); }
ssize_t uvm_ar_flistxattr(int fd, char *list, size_t size) { return flistxattr(fd, list, size); }
ssize_t uvm_ar_fgetxattr(int fd, const char *name, void *value, size_t size) { return fgetxattr(fd, name, value, size); }
int uvm_ar_fsetxattr(int fd, const char *name, const void *value, size_t size) { return fsetxattr(fd, name, value, size, 0); }
int uvm_ar_fremovexattr(int fd, const char *name) { return fremovexattr(fd, name); }
int uvm_ar_lremovexattr(const char *path, const char *name) { return lremovexattr(path, name); }

int uvm_ar_utimens(int dirfd, const char *name, int64_t asec, long ansec, int64_t msec, long mnsec, int flags) {
    struct timespec ts[2] = { { (time_t)asec, ansec }, { (time_t)msec, mnsec } };
    if (name == NULL) return futimens(dirfd, ts);
    return utimensat(dirfd, name, ts, flags);
}

int uvm_ar_all_zero(const void *p, size_t len) {
    static const unsigned char zeros[4096];
    const unsigned char *c = p;
    while (len > 0) {
        size_t n = len < sizeof zeros ? len : sizeof zeros;
        if (memcmp(c, zeros, n) != 0) return 0;
        c += n;
        len -= n;
    }
    return 1;
}
