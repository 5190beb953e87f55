# shellcheck shell=bash
# Helpers shared by the image recipes under images/ (sourced, not run).
# A recipe sets `name` (its message prefix) before sourcing this file.
# Outputs are cached outside the clone, under ${XDG_CACHE_HOME:-$HOME/.cache}/uvm:
#   images/<key>/{initramfs.cpio,busybox.ext4}, images/current -> <key>   (images/build.sh)
#   rootfs/<key>/debian.tar.zst, rootfs/debian -> <key>                  (images/debian/build.sh)
# A key is the first 16 hex digits of the sha256 of everything the output depends on (the
# recipes themselves, their inputs), so a changed recipe builds anew and an unchanged one is a
# cache hit. An output is built in a scratch folder next to the cache and moved into place only
# when complete: an interrupted or failed build leaves nothing that looks cached.

uvm_cache=${XDG_CACHE_HOME:-$HOME/.cache}/uvm

log() { echo "${name:-images}: $*" >&2; }
die() { echo "${name:-images}: error: $*" >&2; exit 1; }

# mkfs.ext4, debugfs and e2fsck live in /sbin, which a normal user's PATH lacks.
PATH=$PATH:/usr/sbin:/sbin

need_tools() {  # TOOL... : dies naming the missing ones
    local missing=() t
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}: run \`make setup\`"
}

# The first 16 hex digits of the sha256 of stdin.
key_of() { sha256sum | cut -c1-16; }

# Points the symlink LINK at TARGET (a name in the same folder), atomically.
point() {  # LINK TARGET
    ln -sfn -- "$2" "$1.$$.tmp"
    mv -T -- "$1.$$.tmp" "$1"
}

# Moves the finished folder STAGE to OUT (replacing whatever is there), atomically enough:
# OUT is either absent or complete.
publish() {  # STAGE OUT
    chmod 0755 -- "$1"
    rm -rf -- "$2"
    mv -T -- "$1" "$2"
}

# The static busybox the busybox distro is made of: $BUSYBOX, else busybox-static's.
find_busybox() {
    local b=${BUSYBOX:-}
    if [[ -z $b ]]; then
        for b in /bin/busybox /usr/bin/busybox ""; do [[ -n $b && -x $b ]] && break; done
    fi
    [[ -n $b && -x $b ]] || die "static busybox not found: run \`make setup\` (installs busybox-static)"
    if ldd "$b" 2>&1 | grep -q '=>'; then
        die "$b is dynamically linked: install busybox-static (run \`make setup\`) or set BUSYBOX"
    fi
    echo "$b"
}

# Sets every mtime under DIR to the epoch: with sorted names, the same inputs give the same bytes.
zero_times() { find "$1" -exec touch -h -d @0 {} +; }

# Makes an ext4 image of SIZE (sparse) at IMG from the folder ROOT, without root: mkfs.ext4 -d
# copies the files, then debugfs sets every owner, since mkfs.ext4 -d copies the builder's uid.
# OWNER_FN PATH sets owner_uid and owner_gid for a path inside the image ("/etc/passwd").
# SCRATCH is a folder for the tools' logs.
ext4_from_dir() {  # ROOT IMG SIZE LABEL OWNER_FN SCRATCH
    local root=$1 img=$2 size=$3 label=$4 owner_fn=$5 scratch=$6
    # 4 KiB blocks: mke2fs would pick 1 KiB ("small") for an image under 512 MiB.
    truncate -s "$size" "$img"
    mkfs.ext4 -q -F -L "$label" -b 4096 -m 0 -E root_owner=0:0 -d "$root" "$img" >"$scratch/mkfs.log" 2>&1 \
        || { cat "$scratch/mkfs.log" >&2; die "mkfs.ext4 -d failed"; }
    local cmds=$scratch/owners.debugfs p
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r p; do
        p=${p#.}
        "$owner_fn" "$p"
        printf 'set_inode_field "%s" uid %s\nset_inode_field "%s" gid %s\n' "$p" "$owner_uid" "$p" "$owner_gid"
    done >"$cmds"
    debugfs -w -f "$cmds" "$img" >"$scratch/debugfs.log" 2>&1 \
        || { tail -n 20 "$scratch/debugfs.log" >&2; die "debugfs failed setting owners"; }
    if grep -qiE 'error|not found|invalid' "$scratch/debugfs.log"; then
        grep -iE 'error|not found|invalid' "$scratch/debugfs.log" | head -n 5 >&2
        die "debugfs reported errors setting owners"
    fi
    e2fsck -fn "$img" >"$scratch/fsck.log" 2>&1 || { tail -n 20 "$scratch/fsck.log" >&2; die "e2fsck found problems in $img"; }
}
