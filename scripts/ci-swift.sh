#!/usr/bin/env bash
# A Swift toolchain for CI (the smoke workflow, action.yml): swift.org's release build for this
# host's distribution (Debian 12, Ubuntu 22.04 or 24.04), its signature checked with swift.org's
# keys, unpacked into PREFIX, plus the Debian/Ubuntu packages it needs.
# Prints the toolchain's bin folder on stdout (for $GITHUB_PATH). Does nothing but print it when
# PREFIX already holds that version.
# Usage (root): scripts/ci-swift.sh VERSION [PREFIX]     e.g. 6.1 /opt/swift
# UVM_SWIFT_PRINT_ONLY=1 prints the URL it would download and stops (for testing).
set -euo pipefail
log() { echo "swift: $*" >&2; }
die() { echo "swift: error: $*" >&2; exit 1; }
(($# >= 1 && $# <= 2)) || die "usage: $0 VERSION [PREFIX]"
version=$1
prefix=${2:-/opt/swift}
[[ $version =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || die "'$version' is not a release version (like 6.1 or 6.1.2)"
[[ $(uname -m) == x86_64 ]] || die "only x86_64 is set up here"

# swift.org names its builds debian12, ubuntu24.04 (in folder ubuntu2404), ...
. /etc/os-release
platform=$ID$VERSION_ID
case $platform in
debian12 | ubuntu22.04 | ubuntu24.04) ;;
*) die "no swift.org build is set up here for $PRETTY_NAME ($platform)" ;;
esac
base=https://download.swift.org/swift-$version-release/${platform//./}/swift-$version-RELEASE
tarball=swift-$version-RELEASE-$platform.tar.gz
if [[ ${UVM_SWIFT_PRINT_ONLY:-0} == 1 ]]; then
    echo "$base/$tarball"
    exit 0
fi
bin=$prefix/usr/bin
if [[ -x $bin/swift ]] && "$bin/swift" --version 2>/dev/null | grep -q "swift-$version-RELEASE"; then
    log "$("$bin/swift" --version 2>/dev/null | head -n 1) is in $prefix"
    echo "$bin"
    exit 0
fi
(($(id -u) == 0)) || die "needs root (apt-get, $prefix)"

# What swift.org's Docker images for these distributions install next to the toolchain.
packages=(curl ca-certificates gnupg binutils gcc g++ libc6-dev git pkg-config tzdata unzip
    libcurl4-openssl-dev libedit-dev libicu-dev libncurses-dev libpython3-dev libsqlite3-dev
    libxml2-dev uuid-dev zlib1g-dev)
[[ $platform == debian12 ]] && packages+=(binutils-gold)
export DEBIAN_FRONTEND=noninteractive
log "apt-get install ${packages[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
log "downloading $base/$tarball"
curl -fsSL --retry 3 -o "$tmp/swift.tar.gz" "$base/$tarball"
curl -fsSL --retry 3 -o "$tmp/swift.tar.gz.sig" "$base/$tarball.sig"
export GNUPGHOME=$tmp/gnupg
mkdir -m 700 "$GNUPGHOME"
curl -fsSL --retry 3 https://swift.org/keys/all-keys.asc | gpg --batch --quiet --import
# A signature by a key that has expired since it signed still verifies (gpg says so and exits 0).
gpg --batch --verify "$tmp/swift.tar.gz.sig" "$tmp/swift.tar.gz" || die "bad signature on $tarball"
rm -rf -- "$prefix"
mkdir -p -- "$prefix"
tar -xzf "$tmp/swift.tar.gz" -C "$prefix" --strip-components=1
"$bin/swift" --version >&2 || die "the unpacked toolchain does not run"
echo "$bin"
