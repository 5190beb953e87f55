#pragma once
// File-system calls for the Archive module (tar writer/extractor) that Swift's Glibc overlay
// lacks or hides behind macros (makedev, xattrs, SEEK_DATA, _GNU_SOURCE flags). Thin wrappers:
// -1 and errno on failure, as the underlying call.
#include <stdint.h>
#include <sys/types.h>

extern const int uvm_ar_O_NOFOLLOW;
extern const int uvm_ar_O_DIRECTORY;
extern const int uvm_ar_O_PATH;
extern const int uvm_ar_O_CLOEXEC;
extern const int uvm_ar_AT_SYMLINK_NOFOLLOW;
extern const int uvm_ar_AT_REMOVEDIR;
extern const int uvm_ar_SEEK_DATA;
extern const int uvm_ar_SEEK_HOLE;
extern const long uvm_ar_UTIME_NOW;
extern const long uvm_ar_UTIME_OMIT;

uint64_t uvm_ar_makedev(uint32_t major, uint32_t minor);
uint32_t uvm_ar_major(uint64_t dev);
uint32_t uvm_ar_minor(uint64_t dev);

/// openat with an explicit mode (Swift cannot call the variadic one reliably).
int uvm_ar_openat(int dirfd, const char *name, int flags, unsigned mode);
/// openat2 with RESOLVE_IN_ROOT: `path` as seen by a process chrooted at `rootfd` (a distro's
/// root, from the agent outside it), never leaving it. flags: O_* (no O_CREAT).
int uvm_ar_open_in_root(int rootfd, const char *path, int flags);
int uvm_ar_mknodat(int dirfd, const char *name, unsigned mode, uint64_t dev);

/// readdir on a DIR*: the next name, or NULL at the end (errno 0) or on error (errno set).
/// The string lives until the next call.
const char *uvm_ar_readdir_name(void *dir);

ssize_t uvm_ar_llistxattr(const char *path, char *list, size_t size);
ssize_t uvm_ar_lgetxattr(const char *path, const char *name, void *value, size_t size);
int uvm_ar_lsetxattr(const char *path, const char *name, const void *value, size_t size);
ssize_t uvm_ar_flistxattr(int fd, char *list, size_t size);
ssize_t uvm_ar_fgetxattr(int fd, const char *name, void *value, size_t size);
int uvm_ar_fsetxattr(int fd, const char *name, const void *value, size_t size);
int uvm_ar_fremovexattr(int fd, const char *name);
int uvm_ar_lremovexattr(const char *path, const char *name);

/// utimensat/futimens with plain integers (tv_nsec may be uvm_ar_UTIME_NOW/OMIT).
/// fd mode when name is NULL: futimens(dirfd).
int uvm_ar_utimens(int dirfd, const char *name, int64_t asec, long ansec, int64_t msec, long mnsec, int flags);

/// Whether `len` bytes at `p` are all zero (memcmp against a static zero page).
int uvm_ar_all_zero(const void *p, size_t len);
