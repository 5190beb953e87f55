#pragma once
// Linux syscalls and _GNU_SOURCE constants that Swift's Glibc overlay does not expose
// (openat2, getdents64, statx, xattrs, OFD locks). Thin wrappers: -1 and errno on failure.
#include <stdint.h>
#include <sys/types.h>

extern const int cp9_O_PATH;
extern const int cp9_O_NOFOLLOW;
extern const int cp9_O_DIRECTORY;
extern const int cp9_O_DIRECT;
extern const int cp9_O_NOATIME;
extern const int cp9_O_LARGEFILE;
extern const int cp9_O_TMPFILE;
extern const int cp9_AT_EMPTY_PATH;
extern const int cp9_AT_SYMLINK_NOFOLLOW;
extern const int cp9_AT_SYMLINK_FOLLOW;
extern const int cp9_AT_REMOVEDIR;

/// Opens one path component `name` beneath `dirfd`: never follows a symlink, never leaves dirfd.
/// Uses openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS) when the kernel has it,
/// else openat(O_NOFOLLOW). Refuses (EINVAL) names that are empty, ".", ".." or contain '/'.
int cp9_open_beneath(int dirfd, const char *name, int flags, unsigned mode);
int cp9_open_beneath_path(int dirfd, const char *path, int flags);
/// accept4(fd, NULL, NULL, SOCK_CLOEXEC).
int cp9_accept(int fd);

/// Whether the running kernel has openat2 (probed once).
int cp9_have_openat2(void);

ssize_t cp9_getdents64(int fd, void *buf, size_t count);

struct cp9_stat {
    uint64_t dev, ino, nlink, rdev, size, blksize, blocks;
    uint32_t mode, uid, gid;
    int64_t atime_sec, mtime_sec, ctime_sec, btime_sec;
    uint32_t atime_nsec, mtime_nsec, ctime_nsec, btime_nsec;
    int has_btime;
};

/// statx(fd, path, flags|AT_SYMLINK_NOFOLLOW) (falls back to fstatat); path "" means fd itself.
int cp9_stat(int fd, const char *path, struct cp9_stat *out);

struct cp9_statfs {
    uint64_t type, bsize, blocks, bfree, bavail, files, ffree, fsid, namelen;
};
int cp9_fstatfs(int fd, struct cp9_statfs *out);

ssize_t cp9_getxattr(const char *path, const char *name, void *value, size_t size);
int cp9_setxattr(const char *path, const char *name, const void *value, size_t size, int flags);
ssize_t cp9_listxattr(const char *path, char *list, size_t size);
int cp9_removexattr(const char *path, const char *name);

/// Open-file-description locks: per open file, not per process, so two guest processes holding
/// different fids of one file conflict as they would on a local file system.
/// cmd 0 = F_OFD_SETLK, 1 = F_OFD_GETLK. type: F_RDLCK/F_WRLCK/F_UNLCK as 0/1/2 (the 9P values).
int cp9_ofd_lock(int fd, int cmd, int *type, int64_t *start, int64_t *len, int32_t *pid);

uint64_t cp9_makedev(uint32_t major, uint32_t minor);
uint32_t cp9_major(uint64_t dev);
uint32_t cp9_minor(uint64_t dev);

/// Gives the calling thread alone (raw syscalls: glibc would change every thread) the file
/// system identity uid/gid with these supplementary groups: what it creates is theirs, and it has
/// their rights. 0 on success, else -1 and errno (the thread may then be partly changed).
int cp9_set_thread_fs_identity(uint32_t uid, uint32_t gid, const uint32_t *groups, int ngroups);

/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts write-out of the range, does not wait.
int cp9_write_behind(int fd, int64_t offset, int64_t count);
