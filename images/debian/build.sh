#!/usr/bin/env bash
# uvm-install: Debian 12 (bookworm) from the Debian mirror your apt uses: bash, apt, sudo, systemd (mmdebstrap)
# The Debian 12 (bookworm) root file system, as a tarball (for `uvm install debian`), built with
# mmdebstrap --variant=minbase plus images/debian/packages, from the Debian mirror the host's apt
# uses (images/debian/sources.py picks the sources; the root gets the same ones, and the host's
# apt proxy settings, so apt-get works inside).
# Cached outside the clone:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/rootfs/<key>/debian.tar.zst
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/rootfs/<key>/debian.ext4      (the same root, as an image)
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/rootfs/debian -> <key>
# key = sha256(this recipe, images/lib.sh, sources.py, the package list, the root's apt sources
# and proxy settings). The tarball is not rebuilt when the mirror gets newer packages: the root
# updates itself with apt. Prints a line per phase on stderr and the tarball's path on stdout.
#
# Usage: images/debian/build.sh       (make debian-rootfs; `uvm install debian` runs it, as the
#                                     `# uvm-install:` line above offers)
# Owners: the tarball holds root:root system files, setuid sudo etc. whoever builds it:
#   as root: mmdebstrap's root mode;
#   as an ordinary user: its unshare mode (a user namespace mapping root to the user's
#     /etc/subuid range; newuidmap from the uidmap package). scripts/setup.sh sets that up.
# Environment: MMDEBSTRAP_MODE (root, unshare, or fakechroot, which gets the owners of
# /var/cache/man and /var/log/journal wrong: instead of the above), DEBIAN_MIRROR
# (a URI instead of the host's sources), TMPDIR (where mmdebstrap unpacks: ~300 MB).
# Variants (images/debian-docker/build.sh) set UVM_DEBIAN_VARIANT=NAME: the root then has
# the packages of images/debian/packages.NAME too, and is cached as rootfs/debian-NAME.
# systemd is the instances' init ([boot] systemd = true in /etc/uvm.conf, as WSL's current
# images do).
set -euo pipefail
variant=${UVM_DEBIAN_VARIANT:-}
[[ -z $variant || $variant =~ ^[a-z0-9]+$ ]] || { echo "debian: error: bad UVM_DEBIAN_VARIANT '$variant'" >&2; exit 1; }
name=debian${variant:+-$variant}
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
source "$here/../lib.sh"

suite=bookworm
(($# == 0)) || die "usage: $0 (no arguments; see the comment at its top)"
# mke2fs and debugfs live in /usr/sbin, which an ordinary user's PATH lacks.
export PATH="$PATH:/usr/sbin:/sbin"
need_tools sha256sum python3 apt-config
cache=$uvm_cache/rootfs
tmp=${TMPDIR:-/tmp}

lists=("$here/packages")
[[ -z $variant ]] || lists+=("$here/packages.$variant")
for f in "${lists[@]}"; do [[ -r $f ]] || die "no package list $f"; done
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "${lists[@]}")
((${#packages[@]})) || die "no packages in ${lists[*]}"

# The root's apt sources and proxy settings, from the host's apt configuration.
eval "$(apt-config shell sourcelist Dir::Etc::sourcelist/f sourceparts Dir::Etc::sourceparts/d)"
sources=$(mktemp -d -- "$tmp/uvm-debian-sources.XXXXXX")
trap 'rm -rf -- "$sources"' EXIT
mirrors=$(python3 "$here/sources.py" "$suite" "${sourcelist:-/etc/apt/sources.list}" \
    "${sourceparts:-/etc/apt/sources.list.d}" "$sources") || die "cannot read the host's apt sources"
[[ -n $mirrors ]] || die "no Debian $suite source for the root (host's apt sources: ${sourcelist:-} ${sourceparts:-})"
# Proxy settings (Acquire::http::Proxy "..."; Acquire::https::Proxy::host "DIRECT"; ...); a
# Proxy-Auto-Detect script is the host's, not the root's.
mapfile -t proxies < <(apt-config dump | grep -E '^Acquire::(http|https|ftp)::Proxy(::[^ ]+)? ' | grep -v ' "";$' || true)

key=$({
    cat -- "$here/../lib.sh" "$here/build.sh" "$here/sources.py" "${lists[@]}"
    echo "suite $suite variant $variant"
    (cd "$sources" && find . -type f | LC_ALL=C sort | while IFS= read -r f; do echo "file $f"; cat -- "$f"; done)
    printf 'proxy %s\n' "${proxies[@]}"
} | key_of)
out=$cache/$key
tarball=$out/debian.tar.zst

# debian.ext4: the tarball as an ext4 image (sparse, small: uvm grows it to the distro's size),
# which `uvm install` copies instead of extracting the tarball in the VM (under TCG that takes
# longer than building the image here). Built as the tarball's owners need: as root, or in a
# user namespace mapping root to the builder and 1..65535 to its /etc/subuid range. Device
# nodes and file capabilities cannot be made there: debugfs adds them to the image afterwards
# (images/debian/special.py reads them from the tarball).
free_mib() { df -Pm -- "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
make_image() {  # TARBALL IMG
    local tarball=$1 img=$2 root
    need_tools mke2fs debugfs
    log "image: $img"
    # The files are unpacked for a moment: in /dev/shm when it has room (a disk's metadata writes
    # can take several times as long as mmdebstrap's unpacking), else in TMPDIR.
    local scratch=$tmp need
    need=$(($(du -m -- "$tarball" | cut -f1) * 5 + 256))
    [[ -d /dev/shm && -w /dev/shm ]] && (($(free_mib /dev/shm || echo 0) >= need)) && scratch=/dev/shm
    root=$(mktemp -d -- "$scratch/uvm-debian-root.XXXXXX")
    # shellcheck disable=SC2016
    local build='set -e
        tar --zstd -xpf "$1" --xattrs --xattrs-include="*" --numeric-owner -C "$2" $4
        mib=$(du -sm "$2" | cut -f1)
        mke2fs -q -F -t ext4 -b 4096 -d "$2" -L debian -E lazy_itable_init=1,lazy_journal_init=1 "$3" "$((mib * 3 / 2 + 256))M"
        rm -rf "$2"'
    local ok=1
    if (($(id -u) == 0)); then
        bash -c "$build" _ "$tarball" "$root" "$img" "" || ok=0
    else
        local me subuid subgid
        me=$(id -un)
        subuid=$(awk -F: -v u="$me" -v i="$(id -u)" '($1 == u || $1 == i) && $3 >= 65535 { print $2; exit }' /etc/subuid)
        subgid=$(awk -F: -v u="$me" -v i="$(id -u)" '($1 == u || $1 == i) && $3 >= 65535 { print $2; exit }' /etc/subgid)
        [[ -n $subuid && -n $subgid ]] || die "no /etc/subuid and /etc/subgid range of 65536 for $me (\`sudo make setup\` adds one)"
        # The device nodes are left out by name (and made by debugfs below).
        tar --zstd -tvf "$tarball" | awk '$1 ~ /^[cb]/ { print $NF }' >"$root.devices"
        unshare --map-root-user --map-users="$subuid,1,65535" --map-groups="$subgid,1,65535" \
            -- bash -c "$build" _ "$tarball" "$root" "$img" "--no-wildcards --exclude-from=$root.devices --xattrs-exclude=security.*" || ok=0
        rm -f -- "$root.devices"
        if ((ok)); then
            local fix
            fix=$(mktemp -d -- "$tmp/uvm-debian-fix.XXXXXX")
            zstd -dcq -- "$tarball" | python3 "$here/special.py" "$fix" >"$fix/cmds" \
                && debugfs -w -f "$fix/cmds" "$img" >"$fix/log" 2>&1 \
                && ! grep -qiE 'error|not found|invalid|cannot' "$fix/log" || { cat "$fix/log" >&2; ok=0; }
            rm -rf -- "$fix"
        fi
        unshare --map-root-user --map-users="$subuid,1,65535" --map-groups="$subgid,1,65535" \
            -- rm -rf -- "$root" 2>/dev/null || true
    fi
    rm -rf -- "$root" 2>/dev/null || true
    ((ok)) || { rm -f -- "$img"; die "cannot make the ext4 image $img from $tarball"; }
}

if [[ -s $tarball && ! -s $out/debian.ext4 ]]; then
    # Cached before images were made: add the image.
    make_image "$tarball" "$out/debian.ext4.partial" && mv -- "$out/debian.ext4.partial" "$out/debian.ext4"
fi
if [[ -s $tarball ]]; then
    point "$cache/$name" "$key"
    log "cached ($tarball)"
    echo "$tarball"
    exit 0
fi

# --- what the build needs ---------------------------------------------------
command -v mmdebstrap >/dev/null 2>&1 \
    || die "mmdebstrap not found: run \`sudo apt-get install -y --no-install-recommends mmdebstrap uidmap zstd\` (or \`make setup\`)"
need_tools zstd
mode=${MMDEBSTRAP_MODE:-}
if [[ -z $mode ]]; then
    if (($(id -u) == 0)); then
        mode=root
    else
        mode=unshare
        me=$(id -un)
        for f in /etc/subuid /etc/subgid; do
            grep -qE "^($me|$(id -u)):" "$f" 2>/dev/null && continue
            # The first free 65536 ids above every range (what scripts/setup.sh adds as root).
            start=$(cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: '
                { end = $2 + $3; if (end > max) max = end }
                END { s = 100000; if (max > s) s = int((max + 65535) / 65536) * 65536; print s }')
            die "no range for $me in $f (mmdebstrap's unshare mode maps the root file system's accounts to it): run \`sudo usermod --add-subuids $start-$((start + 65535)) --add-subgids $start-$((start + 65535)) $me\` (\`sudo make setup\` does it for you)"
        done
        command -v newuidmap >/dev/null 2>&1 \
            || die "newuidmap not found: run \`sudo apt-get install -y --no-install-recommends uidmap\` (or \`make setup\`)"
        unshare --user --map-root-user true 2>/dev/null \
            || die "this kernel refuses unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces, or an AppArmor restriction); build as root, or set MMDEBSTRAP_MODE=fakechroot (needs fakechroot and fakeroot)"
    fi
fi

# mmdebstrap unpacks the root in $TMPDIR, then writes the tarball to the cache.
mkdir -p -- "$cache"
need_free() {  # DIR MIB VARIABLE: dies when DIR's file system has less than MIB free
    local free
    free=$(free_mib "$1")
    [[ -z $free ]] || ((free >= $2)) \
        || die "disk full: $1 has $free MiB free, the build needs about $2 MiB there (free some space, or set $3 to another disk)"
}
need_free "$tmp" 700 TMPDIR
need_free "$cache" 500 XDG_CACHE_HOME  # the tarball (~85 MiB) and the image (~300 MiB)

# Every mirror answers (through the host's apt proxy settings) before mmdebstrap starts.
mirror_uris=$(cut -d' ' -f1 <<<"$mirrors" | sort -u | paste -sd' ')
log "resolving: checking the mirrors ($mirror_uris)"
stage=$(mktemp -d -- "$cache/.build.XXXXXX")
trap 'rm -rf -- "$sources" "$stage"' EXIT
while read -r uri s; do
    if ! /usr/lib/apt/apt-helper -o Acquire::Retries=0 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20 \
        download-file "${uri%/}/dists/$s/InRelease" "$stage/InRelease" >"$stage/mirror.log" 2>&1; then
        why=$(grep -m1 -E '^E: Failed to fetch' "$stage/mirror.log" | sed -e 's/^E: Failed to fetch [^ ]* *//') || true
        via=
        ((${#proxies[@]})) && via=" (through the host's apt proxy settings: ${proxies[*]})"
        die "cannot reach the Debian mirror $uri ($s)$via: ${why:-see \`apt-get update\`}"
    fi
done <<<"$mirrors"
rm -f -- "$stage/InRelease" "$stage/mirror.log"

# --- mmdebstrap ---------------------------------------------------------------
args=(--mode="$mode" --variant=minbase --include="$(IFS=,; echo "${packages[*]}")")
for p in "${proxies[@]}"; do args+=(--aptopt="$p"); done
mirror_files=()
for f in "$sources"/sources.list "$sources"/sources.list.d/*; do
    [[ -f $f ]] && mirror_files+=("$f")
done
# mmdebstrap takes the sources as MIRROR arguments (pasted into its own 0000*.sources/list
# files); the root keeps the host's file names and bytes instead. mmdebstrap copied the host's
# hostname and resolv.conf: uvm names each instance and writes its resolv.conf.
hooks=(
    --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/0000*'
)
[[ -f $sources/sources.list ]] && hooks+=(--customize-hook="copy-in $sources/sources.list /etc/apt")
for f in "$sources"/sources.list.d/*; do
    [[ -f $f ]] && hooks+=(--customize-hook="copy-in $f /etc/apt/sources.list.d")
done
hooks+=(
    --customize-hook='chmod 0644 "$1"/etc/apt/sources.list.d/* && chown -R 0:0 "$1"/etc/apt/sources.list.d'
    --customize-hook='echo LANG=C.UTF-8 >"$1/etc/default/locale"'
    --customize-hook='echo debian >"$1/etc/hostname" && chmod 0644 "$1/etc/hostname"'
    --customize-hook='printf "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"'
    --customize-hook='rm -f "$1/etc/resolv.conf"'
    # systemd as the instance's init; no getty on the console (in a uvm instance /dev/console is
    # the VM's serial console, which is uvm's log).
    --customize-hook='printf "[boot]\nsystemd = true\n" >"$1/etc/uvm.conf" && chmod 0644 "$1/etc/uvm.conf"'
    --customize-hook='ln -sf /dev/null "$1/etc/systemd/system/console-getty.service"'
)

# mmdebstrap's status lines become one progress line per phase; warnings and errors pass through;
# all of it stays in a log shown when the build fails.
phases() {
    local line last=
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$stage/mmdebstrap.log"
        local phase=
        case $line in
            "I: running apt-get update"*) phase="resolving: apt-get update and dependencies ($mode mode)" ;;
            "I: downloading packages"*) phase="downloading: ${#packages[@]} packages and their dependencies" ;;
            "I: extracting archives"*) phase="unpacking" ;;
            "I: installing essential packages"*) phase="configuring: the essential packages" ;;
            "I: installing remaining packages"*) phase="configuring: the other packages" ;;
            "I: running --customize-hook"*) phase="configuring: locale, apt sources, hostname" ;;
            "I: creating tarball"*) phase="packing: $tarball" ;;
            E:* | W:*) echo "debian: mmdebstrap: $line" >&2 ;;
        esac
        if [[ -n $phase && $phase != "$last" ]]; then log "$phase"; last=$phase; fi
    done
}
start=$SECONDS
set +e
mmdebstrap "${args[@]}" "${hooks[@]}" "$suite" "$stage/debian.tar.zst" "${mirror_files[@]}" 2>&1 </dev/null | phases
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
    logf=$stage/mmdebstrap.log
    if grep -qi 'no space left on device' "$logf"; then
        die "disk full while building (${TMPDIR:-/tmp}: $(free_mib "$tmp") MiB free, $cache: $(free_mib "$cache") MiB free): free some space and run it again"
    fi
    if grep -qE 'Could not resolve|Could not connect|Failed to fetch|Unable to connect|Connection failed|Temporary failure' "$logf"; then
        die "cannot reach the Debian mirror ($mirror_uris) during the build: $(grep -m1 -E 'Could not resolve|Could not connect|Failed to fetch|Unable to connect|Connection failed|Temporary failure' "$logf")"
    fi
    tail -n 15 "$logf" >&2
    die "mmdebstrap failed (exit $rc; its output is above)"
fi
rm -f -- "$stage/mmdebstrap.log"
[[ -s $stage/debian.tar.zst ]] || die "mmdebstrap wrote no tarball"
make_image "$stage/debian.tar.zst" "$stage/debian.ext4"
publish "$stage" "$out"
point "$cache/$name" "$key"
log "built in $((SECONDS - start)) s, $(du -m "$tarball" | cut -f1) MiB ($tarball)"
echo "$tarball"
