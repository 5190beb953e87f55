#!/usr/bin/env bash
# Build uvm's guest images, without root:
#   initramfs.cpio  newc cpio: /init = the given uvm-init binary (+ the shared
#                   libraries it needs, if it is dynamic) and empty mount points
#   busybox.ext4    the default "busybox" distro: Debian's static busybox with
#                   an applet symlink each, a root and a `uvm` (1000) user
# Both are cached, keyed by content, outside the clone:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/images/<key>/{initramfs.cpio,busybox.ext4}
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/images/current -> <key>
# key = sha256(uvm-init binary + this script + busybox binary and version).
# busybox.ext4 is a template: copy it before attaching it read-write to a VM.
# Prints the directory on stdout (the tests use it through UVM_IMAGES).
#
# Usage: scripts/images.sh UVM_INIT_BINARY
# Environment: BUSYBOX (default: busybox from busybox-static), XDG_CACHE_HOME,
# DISTRO_SIZE (default 256M; the image is sparse).
set -euo pipefail

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

(($# == 1)) || die "usage: $0 UVM_INIT_BINARY (build uvm-init first, e.g. \`swift build -c release --product uvm-init\`)"
init_bin=$1
[[ -f $init_bin && -x $init_bin ]] || die "uvm-init binary '$init_bin' not found or not executable: build it first"
init_bin=$(readlink -f -- "$init_bin")

script=$(readlink -f -- "${BASH_SOURCE[0]}")
cache=${XDG_CACHE_HOME:-$HOME/.cache}/uvm/images
size=${DISTRO_SIZE:-256M}

# mkfs.ext4, debugfs and e2fsck live in /sbin, which a normal user's PATH lacks.
PATH=$PATH:/usr/sbin:/sbin
missing=()
for cmd in cpio mkfs.ext4 debugfs e2fsck ldd sha256sum truncate; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}: run \`make setup\`"

busybox=${BUSYBOX:-}
if [[ -z $busybox ]]; then
    for b in /bin/busybox /usr/bin/busybox; do [[ -x $b ]] && { busybox=$b; break; }; done
fi
[[ -n $busybox && -x $busybox ]] || die "static busybox not found: run \`make setup\` (installs busybox-static)"
if ldd "$busybox" 2>&1 | grep -q '=>'; then
    die "$busybox is dynamically linked: install busybox-static (run \`make setup\`) or set BUSYBOX"
fi
bb_version=$("$busybox" 2>&1 | sed -n '1s/^BusyBox \(v[^ ]*\).*/\1/p')
[[ -n $bb_version ]] || die "cannot read the version of $busybox"

init_sum=$(sha256sum -- "$init_bin" | cut -d' ' -f1)
bb_sum=$(sha256sum -- "$busybox" | cut -d' ' -f1)
key=$({ echo "uvm-init $init_sum"; echo "busybox $bb_version $bb_sum"; echo "size $size"; cat -- "$script"; } | sha256sum | cut -c1-16)
out=$cache/$key

point_current() {
    ln -sfn -- "$key" "$cache/.current.$$"
    mv -T -- "$cache/.current.$$" "$cache/current"
}

if [[ -s $out/initramfs.cpio && -s $out/busybox.ext4 ]]; then
    point_current
    log "cached ($out)"
    echo "$out"
    exit 0
fi

mkdir -p -- "$cache"
work=$(mktemp -d -- "$cache/.build.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
stage=$work/out
mkdir -p -- "$stage"

# --- (a) initramfs ----------------------------------------------------------
# The kernel first unpacks its built-in default cpio (/dev, /dev/console,
# /root), so /init gets a console although this archive holds no device nodes
# (making one would need root).
log "initramfs: /init = $init_bin"
ird=$work/initramfs
mkdir -p -- "$ird"/{proc,sys,dev,run,tmp,mnt}
chmod 1777 "$ird/tmp"
install -m 0755 -- "$init_bin" "$ird/init"

# Shared libraries (and the dynamic loader) at the paths ldd reports. ldd
# cannot see dlopen()ed libraries (NSS modules, for example): a uvm-init that
# needs those should be linked statically.
if ldd_out=$(ldd "$init_bin" 2>&1); then
    if grep -q 'not found' <<<"$ldd_out"; then
        die "uvm-init needs libraries that are missing on this host: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t' ' ')"
    fi
    libs=$(sed -n -e 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p' <<<"$ldd_out" | sort -u)
    for lib in $libs; do
        mkdir -p -- "$ird$(dirname -- "$lib")"
        cp -L -- "$lib" "$ird$lib"
        log "initramfs: + $lib"
    done
else
    log "initramfs: uvm-init is static, no libraries needed"
fi

# Fixed timestamps and sorted names: the same inputs give the same archive.
find "$ird" -exec touch -h -d @0 {} +
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet >"$stage/initramfs.cpio") \
    || die "cpio failed writing the initramfs"
log "initramfs: $(du -k "$stage/initramfs.cpio" | cut -f1) KiB"

# --- (b) busybox distro -----------------------------------------------------
log "busybox distro: $busybox ($bb_version), $size ext4"
root=$work/distro
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

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
uvm:x:1000:1000:uvm:/home/uvm:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
uvm:x:1000:
nogroup:x:65534:
EOF
# Accounts are locked: uvm starts processes as a user, nobody logs in.
cat >"$root/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
uvm:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
chmod 0600 "$root/etc/shadow"
echo "uvm" >"$root/etc/hostname"
cat >"$root/etc/os-release" <<EOF
NAME="uvm busybox"
ID=uvm-busybox
VERSION_ID=${bb_version#v}
PRETTY_NAME="uvm busybox ($bb_version)"
EOF
cat >"$root/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ "$(id -u)" = 0 ] && PS1='\h:\w# ' || PS1='\u@\h:\w$ '
EOF

find "$root" -exec touch -h -d @0 {} +
img=$stage/busybox.ext4
# 4 KiB blocks: mke2fs would pick 1 KiB ("small") for an image under 512 MiB.
truncate -s "$size" "$img"
mkfs.ext4 -q -F -L busybox -b 4096 -m 0 -E root_owner=0:0 -d "$root" "$img" >"$work/mkfs.log" 2>&1 \
    || { cat "$work/mkfs.log" >&2; die "mkfs.ext4 -d failed"; }

# mkfs.ext4 -d copies the owners of the staged files, i.e. the uid of whoever
# runs this script. Set every owner explicitly (root, and uvm for its home) so
# the image is the same whether or not the builder is root.
cmds=$work/owners.debugfs
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r p; do
    p=${p#.}
    id=0
    [[ $p == /home/uvm ]] && id=1000
    printf 'set_inode_field "%s" uid %s\nset_inode_field "%s" gid %s\n' "$p" "$id" "$p" "$id"
done >"$cmds"
debugfs -w -f "$cmds" "$img" >"$work/debugfs.log" 2>&1 || { tail -n 20 "$work/debugfs.log" >&2; die "debugfs failed setting owners"; }
if grep -qiE 'error|not found|invalid' "$work/debugfs.log"; then
    grep -iE 'error|not found|invalid' "$work/debugfs.log" | head -n 5 >&2
    die "debugfs reported errors setting owners"
fi
e2fsck -fn "$img" >"$work/fsck.log" 2>&1 || { tail -n 20 "$work/fsck.log" >&2; die "e2fsck found problems in $img"; }
log "busybox distro: $n applets, $(du -k "$img" | cut -f1) KiB used of $size"

# --- publish ----------------------------------------------------------------
rm -rf -- "$out"
mv -T -- "$stage" "$out"
point_current
log "built ($out)"
echo "$out"
