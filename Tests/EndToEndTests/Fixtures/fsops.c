// The differential file system script for the 9P share tests: the same operations, run in a
// directory on the share and in one on the guest's tmpfs, must print the same lines.
// Only what both file systems must agree on is printed (no inode numbers, devices, atimes,
// block counts or free space). Built statically on the host, run in the guest.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

static void result(const char *what, int rc) {
    if (rc < 0) printf("%s: errno %s\n", what, strerrorname_np(errno));
    else printf("%s: ok\n", what);
}

static void content(const char *what, const char *path) {
    char buf[256];
    int fd = open(path, O_RDONLY);
    if (fd < 0) { printf("%s: open errno %s\n", what, strerrorname_np(errno)); return; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) { printf("%s: read errno %s\n", what, strerrorname_np(errno)); return; }
    printf("%s: %zd bytes:", what, n);
    for (ssize_t i = 0; i < n; i++) printf(" %02x", (unsigned char)buf[i]);
    printf("\n");
}

static void st(const char *what, const char *path, int follow) {
    struct stat s;
    int rc = follow ? stat(path, &s) : lstat(path, &s);
    if (rc < 0) { printf("%s: stat errno %s\n", what, strerrorname_np(errno)); return; }
    // A directory's size is the file system's own business.
    printf("%s: type %o mode %04o nlink %lu size %lld\n", what, s.st_mode & S_IFMT, s.st_mode & 07777,
           (unsigned long)s.st_nlink, S_ISDIR(s.st_mode) ? 0LL : (long long)s.st_size);
}

static int put(const char *path, const char *text, int flags) {
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// Lists `dir` completely with readdir; prints the count and a hash of the sorted names.
static void listing(const char *what, const char *dir, int expect_dots) {
    DIR *d = opendir(dir);
    if (!d) { printf("%s: opendir errno %s\n", what, strerrorname_np(errno)); return; }
    size_t cap = 1024, n = 0;
    char **names = malloc(cap * sizeof *names);
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d))) {
        if (!expect_dots && (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))) continue;
        if (n == cap) names = realloc(names, (cap *= 2) * sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    int err = errno;
    closedir(d);
    qsort(names, n, sizeof *names, cmp);
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t dups = 0;
    for (size_t i = 0; i < n; i++) {
        if (i && !strcmp(names[i], names[i - 1])) dups++;
        for (const char *p = names[i]; *p; p++) h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
        h = (h ^ '/') * 0x100000001b3ULL;
    }
    // Freed only now: the duplicate check reads the previous name, and free() writes into it.
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    printf("%s: %zu entries, %zu duplicates, hash %016llx%s\n", what, n, dups, (unsigned long long)h,
           err ? " (readdir failed)" : "");
}

int main(int argc, char **argv) {
    if (argc != 2 || chdir(argv[1]) < 0) { fprintf(stderr, "usage: fsops DIR (an empty directory)\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    umask(022);
    char buf[64];

    // create, read, write, append, truncate
    result("create a", put("a", "hello\n", O_EXCL));
    result("create a again (O_EXCL)", put("a", "x", O_EXCL));
    content("read a", "a");
    int fd = open("a", O_WRONLY);
    result("pwrite a", pwrite(fd, "HE", 2, 0) == 2 ? 0 : -1);
    close(fd);
    result("append a", put("a", "more\n", O_APPEND));
    content("after write+append", "a");
    result("truncate a to 3", truncate("a", 3));
    content("after truncate", "a");
    fd = open("a", O_RDWR);
    result("ftruncate a to 10", ftruncate(fd, 10));
    close(fd);
    content("after growing", "a");

    // rename over an existing file
    result("create b", put("b", "bee\n", 0));
    result("rename a over b", rename("a", "b"));
    content("b after rename", "b");
    st("a after rename", "a", 0);
    result("rename missing", rename("nothere", "c"));

    // unlink an open file and keep using it
    fd = open("u", O_RDWR | O_CREAT, 0600);
    int fd2 = open("u", O_RDONLY);
    result("write u", write(fd, "keep", 4) == 4 ? 0 : -1);
    result("unlink open u", unlink("u"));
    st("u after unlink", "u", 0);
    result("write unlinked u", pwrite(fd, "ING", 3, 4) == 3 ? 0 : -1);
    ssize_t n = pread(fd2, buf, sizeof buf, 0);
    printf("read unlinked u via second fd: %zd '%.*s'\n", n, (int)(n > 0 ? n : 0), buf);
    struct stat s;
    fstat(fd, &s);
    printf("fstat unlinked u: nlink %lu size %lld\n", (unsigned long)s.st_nlink, (long long)s.st_size);
    close(fd);
    close(fd2);

    // mkdir, rmdir, rename of directories
    result("mkdir d", mkdir("d", 0755));
    result("mkdir d again", mkdir("d", 0755));
    result("mkdir d/e", mkdir("d/e", 0700));
    st("d/e", "d/e", 0);
    result("rmdir non-empty d", rmdir("d"));
    result("mkdir f", mkdir("f", 0755));
    result("create f/x", put("f/x", "x", 0));
    result("rename d over non-empty f", rename("d", "f"));
    result("rename d to g", rename("d", "g"));
    result("rmdir g/e", rmdir("g/e"));
    result("rmdir g", rmdir("g"));
    result("rmdir missing", rmdir("g"));
    result("unlink a directory", unlink("f"));

    // symlink, readlink
    result("symlink sl -> b", symlink("b", "sl"));
    n = readlink("sl", buf, sizeof buf);
    printf("readlink sl: '%.*s'\n", (int)(n > 0 ? n : 0), buf);
    st("lstat sl", "sl", 0);
    content("read through sl", "sl");
    result("symlink dangling -> /nonexistent/x", symlink("/nonexistent/x", "dangling"));
    n = readlink("dangling", buf, sizeof buf);
    printf("readlink dangling: '%.*s'\n", (int)(n > 0 ? n : 0), buf);
    content("open dangling", "dangling");
    result("readlink of a file", readlink("b", buf, sizeof buf) < 0 ? -1 : 0);

    // hard link
    result("link hl -> b", link("b", "hl"));
    st("b after link", "b", 0);
    result("append via hl", put("hl", "HL\n", O_APPEND));
    content("b after append via hl", "b");
    result("unlink hl", unlink("hl"));
    st("b after unlink hl", "b", 0);

    // chmod, utimes, stat
    result("chmod b 0600", chmod("b", 0600));
    st("b after chmod", "b", 0);
    fd = open("b", O_RDONLY);
    result("fchmod b 0751", fchmod(fd, 0751));
    close(fd);
    st("b after fchmod", "b", 0);
    struct timespec ts[2] = { { 1000000000, 123456789 }, { 1500000000, 987654321 } };
    result("utimensat b", utimensat(AT_FDCWD, "b", ts, 0));
    stat("b", &s);
    // With nanoseconds: Linux 6.1's 9P client left its superblock at the default 1 s time
    // granularity and dropped them itself (kernel-patches/0003 sets 1 ns).
    printf("b times: atime %lld.%09ld mtime %lld.%09ld\n", (long long)s.st_atim.tv_sec, (long)s.st_atim.tv_nsec,
           (long long)s.st_mtim.tv_sec, (long)s.st_mtim.tv_nsec);
    struct timespec omit[2] = { { 0, UTIME_OMIT }, { 1600000000, 0 } };
    result("utimensat b mtime only", utimensat(AT_FDCWD, "b", omit, 0));
    stat("b", &s);
    printf("b times: atime %lld.%09ld mtime %lld.%09ld\n", (long long)s.st_atim.tv_sec, (long)s.st_atim.tv_nsec,
           (long long)s.st_mtim.tv_sec, (long)s.st_mtim.tv_nsec);

    // statfs
    struct statfs sf;
    int rc = statfs(".", &sf);
    printf("statfs: %s\n", rc == 0 && sf.f_bsize > 0 && sf.f_blocks > 0 ? "ok" : "failed");

    // fsync, fdatasync
    fd = open("b", O_WRONLY | O_APPEND);
    result("write b", write(fd, "sync\n", 5) == 5 ? 0 : -1);
    result("fsync b", fsync(fd));
    result("fdatasync b", fdatasync(fd));
    close(fd);

    // a sparse file with data past 4 GiB
    fd = open("sparse", O_RDWR | O_CREAT, 0644);
    off_t far = (off_t)5 << 30;
    result("pwrite at 5 GiB", pwrite(fd, "far", 3, far) == 3 ? 0 : -1);
    fstat(fd, &s);
    printf("sparse size: %lld\n", (long long)s.st_size);
    memset(buf, 'x', sizeof buf);
    n = pread(fd, buf, 3, far);
    printf("read at 5 GiB: %zd '%.*s'\n", n, (int)(n > 0 ? n : 0), buf);
    n = pread(fd, buf, 8, (off_t)1 << 32);
    int zeros = 1;
    for (ssize_t i = 0; i < n; i++) zeros &= buf[i] == 0;
    printf("read at 4 GiB (a hole): %zd bytes, %s\n", n, zeros ? "zeros" : "NOT ZEROS");
    n = pread(fd, buf, 8, far + 3);
    printf("read past the end: %zd\n", n);
    close(fd);
    result("unlink sparse", unlink("sparse"));

    // a directory of 10,000 entries, listed completely
    result("mkdir big", mkdir("big", 0755));
    int made = 0;
    for (int i = 0; i < 10000; i++) {
        char name[64];
        snprintf(name, sizeof name, "big/entry-%05d-%s", i, i % 2 ? "with-a-longer-name-to-vary-sizes" : "x");
        int f = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (f >= 0) { made++; close(f); }
    }
    printf("created in big: %d\n", made);
    listing("list big", "big", 1);
    for (int i = 0; i < 10000; i += 2) {
        char name[64];
        snprintf(name, sizeof name, "big/entry-%05d-x", i);
        unlink(name);
    }
    listing("list big after removing half", "big", 0);

    // flock between two open files; POSIX record locks between two processes
    result("create lk", put("lk", "lock", 0));
    int l1 = open("lk", O_RDWR), l2 = open("lk", O_RDWR);
    result("flock l1 exclusive", flock(l1, LOCK_EX | LOCK_NB));
    result("flock l2 exclusive (held)", flock(l2, LOCK_EX | LOCK_NB));
    result("flock l2 shared (held)", flock(l2, LOCK_SH | LOCK_NB));
    result("unlock l1", flock(l1, LOCK_UN));
    result("flock l2 exclusive (free)", flock(l2, LOCK_EX | LOCK_NB));
    flock(l2, LOCK_UN);
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 2 };
    result("fcntl lock bytes 0-1", fcntl(l1, F_SETLK, &fl));
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        int c = open("lk", O_RDWR);
        struct flock want = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 1, .l_len = 1 };
        int r = fcntl(c, F_SETLK, &want);
        printf("child fcntl lock byte 1 (held): %s\n", r < 0 ? (errno == EAGAIN || errno == EACCES ? "refused" : strerrorname_np(errno)) : "granted");
        struct flock probe = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1 };
        fcntl(c, F_GETLK, &probe);
        printf("child F_GETLK byte 0: %s\n", probe.l_type == F_WRLCK ? "write-locked" : probe.l_type == F_UNLCK ? "unlocked" : "other");
        want.l_start = 2;
        r = fcntl(c, F_SETLK, &want);
        printf("child fcntl lock byte 2 (free): %s\n", r < 0 ? strerrorname_np(errno) : "granted");
        _exit(0);
    }
    waitpid(child, NULL, 0);
    close(l1);
    close(l2);

    // mkfifo: a special file the guest handles itself
    result("mkfifo p", mkfifo("p", 0644));
    st("p", "p", 0);

    listing("final top level", ".", 1);
    return 0;
}
