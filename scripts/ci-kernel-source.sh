#!/usr/bin/env bash
# The guest kernel's source on a host whose archive lacks Debian's linux-source-6.1 (Ubuntu 24.04,
# GitHub's runners: its archive ships 6.8). Used by action.yml before `make setup`.
#   Debian 12 (the archive has it): does nothing; `make setup` installs it.
#   Otherwise: downloads linux-source-6.1 from Debian bookworm (+ -updates, -security: the newest
#   6.1 wins) with a private apt configuration, verified by apt against Debian's archive keys
#   (package debian-archive-keyring, which Ubuntu has too), and installs it with apt-get, so that
#   /usr/src/linux-source-6.1.tar.xz is where scripts/kernel.sh looks and `make setup` counts the
#   package as installed. The package is architecture "all": a tarball and a few dependencies
#   (binutils, xz-utils), nothing that touches the host's kernel.
# Root only. Environment: DEBIAN_MIRROR (default https://deb.debian.org/debian),
# DEBIAN_SECURITY_MIRROR (default https://security.debian.org/debian-security);
# UVM_KERNEL_SOURCE_FROM_DEBIAN=1 takes the download path even where the archive has the package,
# UVM_KERNEL_SOURCE_PRINT_ONLY=1 stops after printing what it would download,
# UVM_KERNEL_SOURCE_DOWNLOAD_ONLY=1 after downloading and checking it (for testing).
set -euo pipefail
log() { echo "kernel-source: $*" >&2; }
die() { echo "kernel-source: error: $*" >&2; exit 1; }
(($(id -u) == 0)) || die "needs root (run it with sudo)"
command -v apt-get >/dev/null || die "apt-get not found: uvm's set-up supports Debian and Ubuntu"
pkg=linux-source-6.1
export DEBIAN_FRONTEND=noninteractive

if [[ ${UVM_KERNEL_SOURCE_FROM_DEBIAN:-0} != 1 ]]; then
    if dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed; then
        log "$pkg is installed"
        exit 0
    fi
    if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [^(]'; then
        log "this host's archive has $pkg: make setup installs it"
        exit 0
    fi
fi

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ ! -r $keyring ]]; then
    log "apt-get install debian-archive-keyring (Debian's archive keys, to verify the download)"
    apt-get install -y -qq --no-install-recommends debian-archive-keyring >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends debian-archive-keyring >/dev/null; } \
        || die "cannot install debian-archive-keyring"
fi

mirror=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-https://security.debian.org/debian-security}
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp"/{lists/partial,cache/archives/partial,empty}
cat >"$tmp/sources.list" <<EOF
deb [signed-by=$keyring] $mirror bookworm main
deb [signed-by=$keyring] $mirror bookworm-updates main
deb [signed-by=$keyring] $security bookworm-security main
EOF
# Only these sources, lists and caches of its own, none of the host's pins; the host's apt.conf
# (a proxy) still applies. The sandbox user _apt could not write to the temporary folder.
apt_debian=(apt-get
    -o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts="$tmp/empty"
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$tmp/empty"
    -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache"
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
    -o APT::Sandbox::User=root -o Debug::NoLocking=1)
log "fetching Debian bookworm's package lists from $mirror and $security"
"${apt_debian[@]}" update -qq || die "apt-get update against Debian's archive failed"
file=$("${apt_debian[@]}" -qq --print-uris download "$pkg" | awk '{print $2}')
[[ -n $file ]] || die "Debian bookworm has no $pkg?"
log "Debian's $pkg: $file"
if [[ ${UVM_KERNEL_SOURCE_PRINT_ONLY:-0} == 1 ]]; then
    "${apt_debian[@]}" --print-uris download "$pkg"
    exit 0
fi
(cd "$tmp" && "${apt_debian[@]}" -qq download "$pkg") || die "downloading $pkg failed"
deb=$(echo "$tmp"/"${pkg}"_*.deb)
[[ -f $deb ]] || die "no .deb after the download"
dpkg-deb -c "$deb" | grep -q " ./usr/src/$pkg.tar.xz$" || die "$(basename -- "$deb") has no /usr/src/$pkg.tar.xz"
if [[ ${UVM_KERNEL_SOURCE_DOWNLOAD_ONLY:-0} == 1 ]]; then
    log "downloaded and checked $(basename -- "$deb") (not installed: UVM_KERNEL_SOURCE_DOWNLOAD_ONLY=1)"
    exit 0
fi
log "apt-get install $(basename -- "$deb")"
apt-get install -y -qq --no-install-recommends "$deb" >/dev/null || die "apt-get install $deb failed"
[[ -e /usr/src/$pkg.tar.xz ]] || die "$pkg is installed but /usr/src/$pkg.tar.xz is missing"
log "ok: /usr/src/$pkg.tar.xz"
