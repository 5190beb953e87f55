#!/usr/bin/env bash
# The initramfs: a newc cpio whose /init is uvm-init (the guest agent), with the shared libraries
# it needs if it is dynamic, empty mount points, and /uvm-host: the interop command the agent
# bind-mounts into every instance, compiled here from uvm-host.c as a static C program (it must
# run in any distribution, whatever libc it has).
#   images/initramfs/build.sh --inputs UVM_INIT   prints what the output depends on besides this file
#   images/initramfs/build.sh UVM_INIT OUT.cpio   builds it
# images/build.sh runs it (make images) and caches the result.
#
# The kernel first unpacks its built-in default cpio (/dev, /dev/console, /root), so /init gets a
# console although this archive holds no device nodes (making one would need root).
set -euo pipefail
name=initramfs
source "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
interop=$here/../../Sources/CSyscalls

if [[ ${1:-} == --inputs ]]; then
    (($# == 2)) || die "usage: $0 --inputs UVM_INIT"
    echo "uvm-init $(sha256sum -- "$2" | cut -d' ' -f1)"
    echo "uvm-host $(cat -- "$here/uvm-host.c" "$interop"/include/uvm_interop.h "$interop"/uvm_interop.c | sha256sum | cut -d' ' -f1)"
    exit 0
fi
(($# == 2)) || die "usage: $0 UVM_INIT OUT.cpio"
init_bin=$1 out=$2
need_tools cpio ldd cc
[[ -f $init_bin && -x $init_bin ]] || die "uvm-init binary '$init_bin' not found or not executable: build it first"

scratch=$(mktemp -d -- "$(dirname -- "$out")/.initramfs.XXXXXX")
trap 'rm -rf -- "$scratch"' EXIT

log "/init = $init_bin"
ird=$scratch/root
mkdir -p -- "$ird"/{proc,sys,dev,run,tmp,mnt}
chmod 1777 "$ird/tmp"
install -m 0755 -- "$init_bin" "$ird/init"
cc -static -Os -s -Wall -Werror -I"$interop/include" -o "$ird/uvm-host" "$here/uvm-host.c" "$interop/uvm_interop.c" \
    || die "cannot compile uvm-host statically (needs gcc and libc6-dev)"
log "/uvm-host: $(du -k "$ird/uvm-host" | cut -f1) KiB, static"

# Shared libraries (and the dynamic loader) at the paths ldd reports. ldd cannot see dlopen()ed
# libraries (NSS modules, for example): a uvm-init that needs those should be linked statically.
if ldd_out=$(ldd "$init_bin" 2>&1); then
    if grep -q 'not found' <<<"$ldd_out"; then
        die "uvm-init needs libraries that are missing on this host: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t' ' ')"
    fi
    libs=$(sed -n -e 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p' <<<"$ldd_out" | sort -u)
    for lib in $libs; do
        mkdir -p -- "$ird$(dirname -- "$lib")"
        cp -L -- "$lib" "$ird$lib"
        log "+ $lib"
    done
else
    log "uvm-init is static, no libraries needed"
fi

zero_times "$ird"
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet >"$out") \
    || die "cpio failed writing the initramfs"
log "$(du -k "$out" | cut -f1) KiB"
