#ifndef CSHMRING_H
#define CSHMRING_H

#include <stddef.h>
#include <stdint.h>

/// The host end of the guest kernel's `uvmshm` 9P transport (kernel-patches/): one shared memory
/// region (a memfd) with a request ring and a reply ring per channel, handed to QEMU's
/// ivshmem-doorbell device through the ivshmem server protocol, plus one eventfd per channel in
/// each direction. Each attached channel has a pump thread that moves bytes between its rings and a
/// stream socket whose other end is a 9P server. The guest writes the shared memory at any time:
/// every index read from it is checked, and a channel whose indices make no sense is closed.
typedef struct uvm_shm uvm_shm;

/// Layout constants, shared with the guest driver (net/9p/trans_uvmshm.c).
enum {
    UVM_SHM_MAGIC = 0x396d7675, /* "uvm9" */
    UVM_SHM_LAYOUT = 1,
    UVM_SHM_MAX_CHANNELS = 8,
    UVM_SHM_CTL = 4096,
    UVM_SHM_CTL_STRIDE = 256,
    UVM_SHM_DATA = 65536,
    /* host_flags: the channel's 9P server takes zero-copy requests (kernel-patches/0005). */
    UVM_SHM_HOST_ZC = 1,
};

/// Creates the region (`channels` channels of `ring_size`-byte rings, a power of two) and listens
/// on `socket_path` for QEMU. NULL on failure with a message in `err`.
uvm_shm *uvm_shm_create(const char *socket_path, unsigned channels, uint32_t ring_size, char *err, size_t errlen);

/// Serves `channel` with the 9P server at the other end of `fd` (which the pump then owns): the
/// rings are reset, and the guest may mount the channel once this returns 0.
int uvm_shm_attach(uvm_shm *shm, unsigned channel, int fd);
/// The same, telling the guest what the server offers (UVM_SHM_HOST_* bits).
int uvm_shm_attach_flags(uvm_shm *shm, unsigned channel, int fd, uint32_t host_flags);

/// Stops the channel's pump, closes its socket and tells the guest the channel is closed.
void uvm_shm_detach(uvm_shm *shm, unsigned channel);

/// Whether QEMU has connected and received the region.
int uvm_shm_connected(uvm_shm *shm);

/// The pid of the QEMU that connected (SO_PEERCRED), or 0.
int uvm_shm_qemu_pid(uvm_shm *shm);

/// Detaches every channel, stops listening, and frees the region.
void uvm_shm_destroy(uvm_shm *shm);

/// For tests, which play the guest: the region, and the eventfds that ring the host's doorbell for a
/// channel and that the host writes to interrupt the guest.
void *uvm_shm_region(uvm_shm *shm, size_t *size);
int uvm_shm_doorbell_fd(uvm_shm *shm, unsigned channel);
int uvm_shm_interrupt_fd(uvm_shm *shm, unsigned channel);

#endif
