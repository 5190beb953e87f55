#!/usr/bin/env bash
# The default "busybox" distro, as an ext4 image: Debian's static busybox with an applet symlink
# each, a root and a `uvm` (1000) user. Built without root (mkfs.ext4 -d, then debugfs sets the
# owners). The image is a template: uvm copies it before attaching it read-write to a VM.
#   images/busybox/build.sh --inputs    prints what the output depends on besides this file
#   images/busybox/build.sh OUT.ext4    builds it
# images/build.sh runs it (make images) and caches the result.
# Environment: BUSYBOX (default: busybox from busybox-static), DISTRO_SIZE (default 256M; sparse).
set -euo pipefail
name="busybox distro"
source "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"

size=${DISTRO_SIZE:-256M}
need_tools mkfs.ext4 debugfs e2fsck ldd truncate
busybox=$(find_busybox)
bb_version=$("$busybox" 2>&1 | sed -n '1s/^BusyBox \(v[^ ]*\).*/\1/p')
[[ -n $bb_version ]] || die "cannot read the version of $busybox"

if [[ ${1:-} == --inputs ]]; then
    echo "busybox $bb_version $(sha256sum -- "$busybox" | cut -d' ' -f1)"
    echo "size $size"
    exit 0
fi
(($# == 1)) || die "usage: $0 OUT.ext4"
img=$1

scratch=$(mktemp -d -- "$(dirname -- "$img")/.busybox.XXXXXX")
trap 'rm -rf -- "$scratch"' EXIT

log "$busybox ($bb_version), $size ext4"
root=$scratch/root
mkdir -p -- "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,home/uvm,mnt/host}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
install -m 0755 -- "$busybox" "$root/bin/busybox"
n=0
while IFS= read -r applet; do
    applet=${applet#/}
    [[ -n $applet && $applet != bin/busybox ]] || continue
    mkdir -p -- "$root/$(dirname -- "$applet")"
    ln -sfn /bin/busybox "$root/$applet"
    n=$((n + 1))
done < <("$busybox" --list-full)
((n > 100)) || die "$busybox --list-full listed only $n applets"

cat >"$root/etc/passwd" <<'EOT'
root:x:0:0:root:/root:/bin/sh
uvm:x:1000:1000:uvm:/home/uvm:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOT
cat >"$root/etc/group" <<'EOT'
root:x:0:
uvm:x:1000:
nogroup:x:65534:
EOT
# Accounts are locked: uvm starts processes as a user, nobody logs in.
cat >"$root/etc/shadow" <<'EOT'
root:*:19000:0:99999:7:::
uvm:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOT
chmod 0600 "$root/etc/shadow"
echo "uvm" >"$root/etc/hostname"
cat >"$root/etc/os-release" <<EOT
NAME="uvm busybox"
ID=uvm-busybox
VERSION_ID=${bb_version#v}
PRETTY_NAME="uvm busybox ($bb_version)"
EOT
cat >"$root/etc/profile" <<'EOT'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ "$(id -u)" = 0 ] && PS1='\h:\w# ' || PS1='\u@\h:\w$ '
EOT

# Everything belongs to root, but the uvm user's home.
owner() {
    if [[ $1 == /home/uvm ]]; then owner_uid=1000 owner_gid=1000; else owner_uid=0 owner_gid=0; fi
}
zero_times "$root"
ext4_from_dir "$root" "$img" "$size" busybox owner "$scratch"
log "$n applets, $(du -k "$img" | cut -f1) KiB used of $size"
