#!/usr/bin/env bash
# make deb: packs STAGE (a `make install DESTDIR=STAGE PREFIX=/usr` tree) as a Debian package.
#   scripts/make-deb.sh STAGE VERSION ARCH OUT.deb
# The binaries link libvirt and glib dynamically (Debian's libraries) and the Swift runtime
# statically, so the package needs no Swift toolchain.
set -euo pipefail
die() { echo "deb: error: $*" >&2; exit 1; }
(($# == 4)) || die "usage: $0 STAGE VERSION ARCH OUT.deb"
stage=$1 version=$2 arch=$3 out=$4
[[ -x $stage/usr/bin/uvm && -x $stage/usr/bin/uvmd ]] || die "$stage holds no installed uvm (make install DESTDIR=$stage PREFIX=/usr)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (package dpkg)"
# No library of the Swift toolchain may be needed at run time.
for b in "$stage/usr/bin/uvm" "$stage/usr/bin/uvmd"; do
    if ldd "$b" | grep -E 'libswift|libFoundation|libdispatch|libBlocksRuntime|_FoundationICU' >&2; then
        die "$b links the Swift runtime dynamically (above): it must be linked with -static-stdlib"
    fi
done
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: uvm
Version: $version
Architecture: $arch
Maintainer: uvm developers <uvm-developers@users.noreply.invalid>
Installed-Size: $size
Section: admin
Priority: optional
Depends: libc6 (>= 2.36), libstdc++6, libgcc-s1, libglib2.0-0, libvirt0 (>= 9.0), libvirt-daemon, libvirt-daemon-driver-qemu, qemu-system-x86, e2fsprogs, zstd, libfuse3-3, fuse3
Recommends: libvirt-daemon-system, mmdebstrap, uidmap, python3, xz-utils, bzip2
Description: lightweight Linux utility VM (WSL2 for Linux hosts)
 uvm boots a small VM on demand through libvirt and runs Linux distributions
 inside it: \`uvm exec -- make\`, \`uvm shell\`, host folders shared over 9P,
 guest ports forwarded to localhost, and an idle reaper that stops the VM
 after its last client. Ships its own guest kernel and initramfs.
CONTROL
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "deb: $out ($(du -m "$out" | cut -f1) MiB)"
