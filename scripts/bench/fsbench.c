// File-sharing micro-benchmarks, run in the guest against one directory (a 9P mount or tmpfs).
// Prints one JSON object of seconds per operation. Built statically by scripts/bench_9p.py.
//   fsbench DIR write MiB | read MiB | files N | list N | stattree SUBDIR | rtt N
#define _GNU_SOURCE
#include <dirent.h>
#include <ftw.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

static long visited;
static int visit(const char *path, const struct stat *st, int type, struct FTW *f) {
    (void)path; (void)st; (void)type; (void)f;
    visited++;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 || chdir(argv[1]) < 0) { fprintf(stderr, "usage: fsbench DIR write|read|files|list|rtt N | stattree SUBDIR\n"); return 2; }
    const char *op = argv[2];
    long n = atol(argv[3]);
    enum { CHUNK = 1 << 20 };
    char *buf = malloc(CHUNK);
    memset(buf, 0x5a, CHUNK);
    double t0 = now(), t;
    if (!strcmp(op, "write")) {
        int fd = open("seq", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) die("open seq");
        for (long i = 0; i < n; i++) if (write(fd, buf, CHUNK) != CHUNK) die("write");
        if (fsync(fd) < 0) die("fsync");
        close(fd);
        printf("{\"write_s\": %.4f}\n", now() - t0);
    } else if (!strcmp(op, "read")) {
        int fd = open("seq", O_RDONLY);
        if (fd < 0) die("open seq");
        long total = 0;
        ssize_t k;
        while ((k = read(fd, buf, CHUNK)) > 0) total += k;
        close(fd);
        if (total != n * (long)CHUNK) { fprintf(stderr, "read %ld bytes, expected %ld\n", total, n * (long)CHUNK); return 1; }
        printf("{\"read_s\": %.4f}\n", now() - t0);
    } else if (!strcmp(op, "files")) {
        char name[64];
        mkdir("files", 0755);
        for (long i = 0; i < n; i++) {
            snprintf(name, sizeof name, "files/f%06ld", i);
            int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
            if (fd < 0) die("create");
            close(fd);
        }
        double created = now();
        struct stat s;
        for (long i = 0; i < n; i++) {
            snprintf(name, sizeof name, "files/f%06ld", i);
            if (stat(name, &s) < 0) die("stat");
        }
        double statted = now();
        for (long i = 0; i < n; i++) {
            snprintf(name, sizeof name, "files/f%06ld", i);
            if (unlink(name) < 0) die("unlink");
        }
        t = now();
        printf("{\"create_s\": %.4f, \"stat_s\": %.4f, \"unlink_s\": %.4f, \"files_s\": %.4f}\n",
               created - t0, statted - created, t - statted, t - t0);
    } else if (!strcmp(op, "list")) {
        char name[64];
        mkdir("dir", 0755);
        for (long i = 0; i < n; i++) {
            snprintf(name, sizeof name, "dir/entry-%06ld", i);
            int fd = open(name, O_WRONLY | O_CREAT, 0644);
            if (fd < 0) die("create");
            close(fd);
        }
        t0 = now();
        DIR *d = opendir("dir");
        if (!d) die("opendir");
        long count = 0;
        while (readdir(d)) count++;
        closedir(d);
        double listed = now();
        // ls -l: the names and a stat of each.
        d = opendir("dir");
        struct dirent *e;
        struct stat s;
        while ((e = readdir(d))) fstatat(dirfd(d), e->d_name, &s, AT_SYMLINK_NOFOLLOW);
        closedir(d);
        t = now();
        if (count != n + 2) { fprintf(stderr, "listed %ld entries, expected %ld\n", count, n + 2); return 1; }
        printf("{\"list_s\": %.4f, \"list_stat_s\": %.4f}\n", listed - t0, t - listed);
    } else if (!strcmp(op, "stattree")) {
        // stattree SUBDIR: what `git status` does, lstat of every entry of a tree, twice; the
        // second pass is what a metadata cache changes.
        double t0 = now();
        if (nftw(argv[3], visit, 64, FTW_PHYS) != 0) die("nftw");
        long first = visited;
        double t1 = now();
        if (nftw(argv[3], visit, 64, FTW_PHYS) != 0) die("nftw");
        double t2 = now();
        printf("{\"stattree_entries\": %ld, \"stattree1_s\": %.6f, \"stattree2_s\": %.6f}\n", first, t1 - t0, t2 - t1);
    } else if (!strcmp(op, "rtt")) {
        // rtt N: N fchmod calls on one open file. Each is one request the caller waits for (a 9P
        // Tsetattr), so this is a share's round trip, with the least guest work around it.
        int fd = open("rtt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) die("open rtt");
        t0 = now();
        for (long i = 0; i < n; i++) if (fchmod(fd, i & 1 ? 0644 : 0600) < 0) die("fchmod");
        t = now();
        close(fd);
        unlink("rtt");
        printf("{\"rtt_us\": %.1f}\n", (t - t0) / n * 1e6);
    } else {
        fprintf(stderr, "unknown operation %s\n", op);
        return 2;
    }
    return 0;
}
