#!/usr/bin/env bash
# make install / make uninstall / make deb (Makefile.d/install.mk says the layout).
#   scripts/install.sh install DESTDIR PREFIX BIN KERNEL_DIR IMAGES_DIR MANUAL_DIR
#   scripts/install.sh uninstall DESTDIR PREFIX
# Every installed file is listed, with its sha256, in PREFIX/share/uvm/manifest: uninstall removes
# exactly those (and the folders they leave empty), and `uvm doctor` checks the kernel and images
# against it.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "install: error: $*" >&2; exit 1; }
(($# >= 3)) || die "usage: $0 install|uninstall DESTDIR PREFIX [BIN KERNEL_DIR IMAGES_DIR MANUAL_DIR]"
action=$1 destdir=$2 prefix=${3%/}
[[ $prefix == /* ]] || die "PREFIX must be an absolute path (got '$prefix')"
root=$destdir$prefix
manifest=$root/share/uvm/manifest

# systemd looks for user units in PREFIX/lib/systemd/user for /usr and /usr/local, and in
# ~/.local/share/systemd/user for a prefix in the home folder.
units=lib/systemd/user
[[ -n ${HOME:-} && $prefix == "$HOME"/* ]] && units=share/systemd/user

case $action in
install)
    (($# == 7)) || die "usage: $0 install DESTDIR PREFIX BIN KERNEL_DIR IMAGES_DIR MANUAL_DIR"
    bin=$4 kernel=$5 images=$6 manual=$7
    for f in "$bin/uvm" "$bin/uvmd" "$bin/uvm-version" "$kernel/bzImage" "$kernel/release" \
        "$images/initramfs.cpio" "$images/busybox.ext4"; do
        [[ -s $f ]] || die "$f is missing: run \`make build kernel images\` first"
    done
    compgen -G "$manual/*.1" >/dev/null || die "no man pages in $manual: run \`make manual\` first"
    # A reinstall over an older one: what the older one listed and this one does not goes.
    [[ -f $manifest ]] && "$0" uninstall "$destdir" "$prefix"
    files=()
    put() {  # SRC REL MODE: a copy (sparse where the source is) at $root/REL
        mkdir -p -- "$(dirname -- "$root/$2")"
        rm -f -- "$root/$2"
        cp --sparse=always -- "$1" "$root/$2"
        chmod "$3" -- "$root/$2"
        files+=("$2")
    }
    text() {  # REL MODE: standard input becomes $root/REL
        mkdir -p -- "$(dirname -- "$root/$1")"
        cat >"$root/$1"
        chmod "$2" -- "$root/$1"
        files+=("$1")
    }
    put "$bin/uvm" bin/uvm 0755
    put "$bin/uvmd" bin/uvmd 0755
    put "$bin/uvm-version" share/uvm/version 0644
    put "$kernel/bzImage" share/uvm/kernel/bzImage 0644
    put "$kernel/release" share/uvm/kernel/release 0644
    # The same kernel uncompressed, booted through its PVH entry (Paths.bootImage); older kernel
    # builds have none, and the bzImage boots then.
    [[ -s $kernel/vmlinux ]] && put "$kernel/vmlinux" share/uvm/kernel/vmlinux 0644
    put "$images/initramfs.cpio" share/uvm/images/initramfs.cpio 0644
    put "$images/busybox.ext4" share/uvm/images/busybox.ext4 0644
    # The recipes `uvm install` runs (the initramfs and busybox recipes build what is above).
    put images/lib.sh share/uvm/recipes/lib.sh 0644
    for f in images/debian/* images/debian-docker/*; do
        mode=0644
        [[ -x $f ]] && mode=0755
        d=${f%/*}
        put "$f" "share/uvm/recipes/${d##*/}/${f##*/}" "$mode"
    done
    # (Not piped into `text`: a function in a pipeline runs in a subshell and its list is lost.)
    text share/bash-completion/completions/uvm 0644 < <("$bin/uvm" --generate-completion-script bash)
    text share/zsh/site-functions/_uvm 0644 < <("$bin/uvm" --generate-completion-script zsh)
    text share/fish/vendor_completions.d/uvm.fish 0644 < <("$bin/uvm" --generate-completion-script fish)
    for f in "$manual"/*.1; do put "$f" "share/man/man1/${f##*/}" 0644; done
    text "$units/uvmd.service" 0644 < <(sed -e "s|^ExecStart=.*|ExecStart=$prefix/bin/uvmd serve|" \
        -e '/^# Adjust to where uvmd is installed/d' packaging/systemd/uvmd.service)
    put packaging/systemd/uvmd.socket "$units/uvmd.socket" 0644
    (cd "$root" && sha256sum -- "${files[@]}") >"$manifest.tmp"
    mv -- "$manifest.tmp" "$manifest"
    echo "install: ${#files[@]} files under $root (listed in $manifest)"
    ;;
uninstall)
    [[ -f $manifest ]] || die "nothing to uninstall: $manifest is missing (was uvm installed with PREFIX=$prefix${destdir:+ DESTDIR=$destdir}?)"
    n=0
    while read -r _ rel; do
        # Only relative paths inside the prefix, as install wrote them.
        [[ -n $rel && $rel != /* && $rel != *..* ]] || die "unexpected line in $manifest: '$rel'"
        rm -f -- "${root:?}/$rel"
        # The folders it leaves empty go too, up to the prefix.
        d=$(dirname -- "$rel")
        while [[ $d != . ]]; do
            rmdir -- "$root/$d" 2>/dev/null || break
            d=$(dirname -- "$d")
        done
        n=$((n + 1))
    done <"$manifest"
    rm -f -- "$manifest"
    for d in share/uvm/recipes/debian share/uvm/recipes/debian-docker share/uvm/recipes share/uvm; do rmdir -- "$root/$d" 2>/dev/null || true; done
    echo "uninstall: removed $n files under $root"
    ;;
*) die "unknown action '$action' (install or uninstall)" ;;
esac
