#!/usr/bin/env bash
# `make images`: the guest images uvmd boots, each built by its recipe under images/:
#   initramfs.cpio  images/initramfs/build.sh: /init = the given uvm-init binary
#   busybox.ext4    images/busybox/build.sh: the default "busybox" distro
# Both are cached together, keyed by content, outside the clone:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/images/<key>/{initramfs.cpio,busybox.ext4}
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/images/current -> <key>
# key = sha256(the recipes, images/lib.sh and this script, and each recipe's --inputs: the
# uvm-init binary, the busybox binary and version, the image size).
# Prints the directory on stdout (uvmd's default; the tests use it through UVM_IMAGES).
# (The Debian root file system, images/debian/build.sh, is built on its own: make debian-rootfs.)
#
# Usage: images/build.sh UVM_INIT_BINARY
set -euo pipefail
name=images
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"

(($# == 1)) || die "usage: $0 UVM_INIT_BINARY (build uvm-init first, e.g. \`swift build -c release --product uvm-init\`)"
init_bin=$1
[[ -f $init_bin && -x $init_bin ]] || die "uvm-init binary '$init_bin' not found or not executable: build it first"
init_bin=$(readlink -f -- "$init_bin")
need_tools sha256sum

cache=$uvm_cache/images
recipes=("$here/initramfs/build.sh" "$here/busybox/build.sh")
key=$({
    cat -- "$here/lib.sh" "$here/build.sh" "${recipes[@]}"
    "$here/initramfs/build.sh" --inputs "$init_bin"
    "$here/busybox/build.sh" --inputs
} | key_of) || die "cannot compute the cache key"
out=$cache/$key

if [[ -s $out/initramfs.cpio && -s $out/busybox.ext4 ]]; then
    point "$cache/current" "$key"
    log "cached ($out)"
    echo "$out"
    exit 0
fi

mkdir -p -- "$cache"
stage=$(mktemp -d -- "$cache/.build.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT
"$here/initramfs/build.sh" "$init_bin" "$stage/initramfs.cpio"
"$here/busybox/build.sh" "$stage/busybox.ext4"
publish "$stage" "$out"
point "$cache/current" "$key"
log "built ($out)"
echo "$out"
