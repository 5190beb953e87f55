// uvm-host: runs a program on the host from a uvm session (interop). Bind-mounted into every
// distro instance at /run/uvm/bin/uvm-host (and /run/uvm/interop/xdg-open), so it is static C
// (images/initramfs/build.sh compiles it): it must run in any distribution, whatever libc it has,
// or none. The socket work is CSyscalls' uvm_interop_client, shared with the agent's side.
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uvm_interop.h"

static const char usage[] =
    "usage: uvm-host [--] PROGRAM [ARG...]\n"
    "Runs PROGRAM on the host, as the user who started this uvm session, with this stdin, stdout and\n"
    "stderr, and exits with its status. In a share (/mnt/host/NAME) it starts in the matching host\n"
    "folder, else in the host user's home. Needs [interop] enabled = true in the host's uvm.conf.\n";

static const char off[] =
    "uvm-host: interop is off for this session, so host programs cannot be run from the VM. To turn it on,\n"
    "put this in ~/.config/uvm/uvm.conf on the host (or set UVM_INTEROP_ENABLED=1 for uvmd), restart uvmd\n"
    "(`uvm stop`, then end the uvmd process) and start a new session:\n"
    "  [interop]\n"
    "  enabled = true\n"
    "It is off by default because it lets whatever runs in the VM run programs on the host as you.\n"
    "A distribution can also refuse it with [interop] enabled = false in its /etc/uvm.conf.\n";

/// Appends `s` as a JSON string; 0, or -1 when `out` is full.
static int json_string(char *out, size_t cap, size_t *n, const char *s) {
    if (*n + 1 >= cap) return -1;
    out[(*n)++] = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        size_t k;
        if (*p == '"' || *p == '\\') { esc[0] = '\\'; esc[1] = (char)*p; k = 2; }
        else if (*p < 0x20) k = (size_t)snprintf(esc, sizeof esc, "\\u%04x", *p);
        else { esc[0] = (char)*p; k = 1; }
        if (*n + k + 1 >= cap) return -1;
        memcpy(out + *n, esc, k);
        *n += k;
    }
    out[(*n)++] = '"';
    return 0;
}

int main(int argc, char **argv) {
    const char *self = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    int first = 1;
    int xdg = strcmp(self, "xdg-open") == 0;
    if (!xdg) {
        if (argc < 2) { fputs(usage, stderr); return 2; }
        if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) { fputs(usage, stdout); return 0; }
        if (!strcmp(argv[1], "--")) first = 2;
        if (first >= argc) { fputs("uvm-host: no program given (uvm-host -- PROGRAM [ARG...])\n", stderr); return 2; }
    }
    const char *socket = getenv("UVM_INTEROP");
    if (!socket || !*socket) { fputs(off, stderr); return 1; }

    static char json[UVM_INTEROP_MAX_REQUEST];
    size_t n = 0, cap = sizeof json;
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "/");
    int ok = 0;
    n += (size_t)snprintf(json, cap, "{\"argv\":[");
    if (xdg) ok |= json_string(json, cap, &n, "xdg-open");
    for (int i = first; i < argc && ok == 0; i++) {
        if ((i > first || xdg) && n + 1 < cap) json[n++] = ',';
        ok |= json_string(json, cap, &n, argv[i]);
    }
    if (ok == 0 && n + 10 < cap) { memcpy(json + n, "],\"cwd\":", 8); n += 8; } else ok = -1;
    if (ok == 0) ok |= json_string(json, cap, &n, cwd);
    if (ok == 0 && n + 2 < cap) json[n++] = '}'; else ok = -1;
    if (ok != 0) { fputs("uvm-host: the command line is too long\n", stderr); return 2; }
    return uvm_interop_client(socket, json, n);
}
