// libfuse3's high-level API (Debian's libfuse3-dev). Its entry points are macros picking a
// versioned symbol, which Swift cannot call: the inline functions below do it for us.
#define FUSE_USE_VERSION 35
#include <fuse.h>
#include <errno.h>
#include <sys/stat.h>

static inline struct fuse *uvm_fuse_new(struct fuse_args *args, const struct fuse_operations *op, void *data) {
    return fuse_new(args, op, sizeof(*op), data);
}

/// The multi-threaded loop; returns when the file system is unmounted or a signal ends it.
static inline int uvm_fuse_loop_mt(struct fuse *f, unsigned max_idle_threads) {
    struct fuse_loop_config config = { .clone_fd = 0, .max_idle_threads = max_idle_threads };
    return fuse_loop_mt(f, &config);
}

static inline void *uvm_fuse_private_data(void) {
    struct fuse_context *c = fuse_get_context();
    return c ? c->private_data : 0;
}
