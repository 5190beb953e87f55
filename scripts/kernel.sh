#!/usr/bin/env bash
# Build uvm's guest kernel (bzImage) from Debian's linux-source tarball (or an
# unpacked kernel source dir) with kernel-patches/*.patch applied and
# kernel-config/uvm.config merged onto tinyconfig. The result is cached outside
# the clone, keyed by content:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/kernel/<key>/{bzImage,vmlinux,config,release}
#   ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/kernel/current -> <key>
# key = sha256(fragment + patches + source identity + this script), so a change
# to any of them rebuilds, and an unchanged second run takes a second or two.
#
# Environment: KERNEL_SRC (tarball or dir; default Debian's linux-source-6.1),
# XDG_CACHE_HOME, JOBS (default: nproc).
set -euo pipefail
# The whole script is one { ...; exit; } block, so bash parses all of it before
# running any of it: editing this file during a long build cannot derail it.
{

log() { echo "kernel: $*" >&2; }
die() { echo "kernel: error: $*" >&2; exit 1; }

script=$(readlink -f -- "${BASH_SOURCE[0]}")
root=$(dirname -- "$(dirname -- "$script")")
fragment=$root/kernel-config/uvm.config
patches=("$root"/kernel-patches/*.patch)
[[ -e ${patches[0]} ]] || patches=()
src=${KERNEL_SRC:-/usr/src/linux-source-6.1.tar.xz}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/uvm/kernel
jobs=${JOBS:-$(nproc)}
# The fragment is x86_64-only; without ARCH=x86_64, tinyconfig builds i386.
export ARCH=x86_64

[[ -r $fragment ]] || die "missing $fragment (run from a uvm checkout)"
[[ -e $src ]] || die "kernel source $src not found: run \`make setup\` (installs linux-source-6.1) or set KERNEL_SRC"
mkdir -p -- "$cache"

# --- source identity --------------------------------------------------------
if [[ -d $src ]]; then
    src=$(readlink -f -- "$src")
    [[ -f $src/Makefile && -f $src/scripts/kconfig/merge_config.sh ]] || die "$src is not a kernel source tree"
    src_id="dir $src $(make -s -C "$src" kernelversion 2>/dev/null)" || die "cannot read kernelversion from $src"
else
    src=$(readlink -f -- "$src")
    # Hashing 140 MB takes ~1 s; remember the hash per (path, size, mtime).
    stamp="$src $(stat -c '%s %Y' -- "$src")"
    memo=$cache/.source-sha256
    sum=""
    if [[ -r $memo ]] && [[ $(sed -n 1p "$memo") == "$stamp" ]]; then
        sum=$(sed -n 2p "$memo")
    fi
    if [[ -z $sum ]]; then
        sum=$(sha256sum -- "$src" | cut -d' ' -f1)
        printf '%s\n%s\n' "$stamp" "$sum" >"$memo.$$" && mv -f -- "$memo.$$" "$memo"
    fi
    src_id="tarball sha256:$sum"
fi

key=$({ echo "fragment"; cat -- "$fragment"; for p in "${patches[@]}"; do echo "patch $(basename -- "$p")"; cat -- "$p"; done; echo "source $src_id"; echo "script"; cat -- "$script"; } | sha256sum | cut -c1-16)
out=$cache/$key

point_current() {
    ln -sfn -- "$key" "$cache/.current.$$"
    mv -T -- "$cache/.current.$$" "$cache/current"
}

if [[ -s $out/bzImage && -s $out/release && -s $out/config ]]; then
    point_current
    log "cached $(cat -- "$out/release") ($out)"
    echo "$out"
    exit 0
fi

# --- build dependencies -----------------------------------------------------
missing=()
for cmd in make gcc ld strip bc bison flex perl tar xz sha256sum flock patch; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[[ -e /usr/include/libelf.h ]] || missing+=("libelf.h (libelf-dev)")
[[ -e /usr/include/openssl/opensslv.h ]] || missing+=("openssl headers (libssl-dev)")
((${#missing[@]} == 0)) || die "missing build dependencies: ${missing[*]}: run \`make setup\`"

# One kernel build at a time per cache (the machines have 2 cores).
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "waiting for another kernel build to finish"
    flock 9
fi
if [[ -s $out/bzImage && -s $out/release && -s $out/config ]]; then
    point_current
    log "cached $(cat -- "$out/release") ($out)"
    echo "$out"
    exit 0
fi

work=$(mktemp -d -- "$cache/.build.XXXXXX")
buildlog=$cache/last-build.log
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT
start=$SECONDS

# --- source tree ------------------------------------------------------------
if [[ -d $src ]]; then
    srcdir=$src
    log "using source dir $srcdir (built out of tree)"
    # A source dir is not ours to change: it must carry the patches already.
    for p in "${patches[@]}"; do
        patch -d "$srcdir" -p1 -R --dry-run -s -f <"$p" >/dev/null 2>&1 \
            || die "$srcdir lacks $(basename -- "$p"): apply it (patch -p1 < $p) or use the tarball"
    done
else
    log "unpacking $src"
    mkdir -p -- "$work/src"
    tar -xf "$src" -C "$work/src" --strip-components=1 || die "cannot unpack $src"
    srcdir=$work/src
    for p in "${patches[@]}"; do
        log "applying $(basename -- "$p")"
        patch -d "$srcdir" -p1 -s -f <"$p" >>"$buildlog" 2>&1 || die "$(basename -- "$p") does not apply (log: $buildlog)"
    done
fi
obj=$work/obj
mkdir -p -- "$obj"
kmake() { make -C "$srcdir" O="$obj" ARCH="$ARCH" "$@"; }

# --- configuration ----------------------------------------------------------
log "configuring: tinyconfig + $(basename -- "$fragment")"
kmake -s tinyconfig >"$buildlog" 2>&1 || { tail -n 20 "$buildlog" >&2; die "make tinyconfig failed (log: $buildlog)"; }
(cd "$obj" && "$srcdir/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment") >>"$buildlog" 2>&1 \
    || { tail -n 20 "$buildlog" >&2; die "merge_config.sh failed (log: $buildlog)"; }
kmake -s olddefconfig >>"$buildlog" 2>&1 || { tail -n 20 "$buildlog" >&2; die "make olddefconfig failed (log: $buildlog)"; }

# Every line of the fragment must survive olddefconfig; a dropped option means
# an unmet dependency, and the fragment must be fixed.
dropped=0
while IFS= read -r line; do
    if [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if grep -q -- "^$sym=" "$obj/.config"; then
            log "dropped: wanted '$line', got '$(grep -- "^$sym=" "$obj/.config")'"
            dropped=1
        fi
    elif [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)= ]]; then
        sym=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$obj/.config"; then
            got=$(grep -E -- "^$sym=|^# $sym is not set" "$obj/.config" || true)
            log "dropped: wanted '$line', got '${got:-nothing (dependency not met)}'"
            dropped=1
        fi
    fi
done <"$fragment"
((dropped == 0)) || die "options of $fragment did not reach .config: fix the fragment (add the missing dependencies)"

# --- build ------------------------------------------------------------------
# Condense make's output: the full log goes to $buildlog, and a progress line
# (objects done, elapsed time, last file) is printed every 15 s, also while
# make is quiet (linking vmlinux). The object count of the previous build, if
# any, gives a rough percentage.
log "building bzImage with -j$jobs (about 5 min on 2 idle cores; log: $buildlog)"
countfile=$cache/.object-count
expected=$(cat -- "$countfile" 2>/dev/null || true)
[[ $expected =~ ^[0-9]+$ ]] || expected=0
progress() {
    local n=0 last="" next=$((SECONDS + 15)) line buf="" pct=""
    while :; do
        if IFS= read -r -t 5 line; then
            line=$buf$line
            buf=""
        elif (($? > 128)); then # timeout: keep any partial line
            buf+=$line
            line=""
        else # end of output
            line=$buf$line
            [[ -n $line ]] && printf '%s\n' "$line" >>"$buildlog"
            break
        fi
        if [[ -n $line ]]; then
            printf '%s\n' "$line" >>"$buildlog"
            case $line in
            "  CC "* | "  AS "* | "  LD "* | "  AR "*) n=$((n + 1)); last=${line##* } ;;
            *error:* | *Error\ *) printf 'kernel: %s\n' "$line" >&2 ;;
            esac
        fi
        if ((SECONDS >= next)); then
            ((expected > 0)) && pct=" (~$((n * 100 / expected > 99 ? 99 : n * 100 / expected))%)"
            log "  ... $n objects$pct, $((SECONDS - start)) s, ${last}"
            next=$((SECONDS + 15))
        fi
    done
    echo "$n" >"$work/object-count"
}
if ! kmake -j"$jobs" bzImage 2>&1 | progress; then
    tail -n 30 "$buildlog" >&2
    die "kernel build failed (full log: $buildlog)"
fi
mv -f -- "$work/object-count" "$countfile"

release=$(kmake -s kernelrelease)
[[ -s $obj/arch/x86/boot/bzImage ]] || die "build finished but no bzImage (log: $buildlog)"

# --- publish ----------------------------------------------------------------
stage=$work/out
mkdir -p -- "$stage"
cp -- "$obj/arch/x86/boot/bzImage" "$stage/bzImage"
# The ELF kernel too, without its symbol table: QEMU boots it through its PVH entry point.
strip -o "$stage/vmlinux" -- "$obj/vmlinux" || die "cannot strip vmlinux"
cp -- "$obj/.config" "$stage/config"
echo "$release" >"$stage/release"
rm -rf -- "$out"
mv -T -- "$stage" "$out"
point_current
log "built $release in $((SECONDS - start)) s ($(du -k "$out/bzImage" | cut -f1) KiB bzImage): $out"
echo "$out"
exit 0
}
