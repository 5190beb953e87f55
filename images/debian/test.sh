#!/usr/bin/env bash
# Checks the Debian root file system recipe's output (make debian-rootfs-test; not part of
# `make test` yet). Builds it when not cached (a few minutes), then checks the tarball:
#   ./etc/os-release says VERSION_ID="12"; ./usr/bin/bash is there; ./usr/bin/sudo is 0/0, 4755;
#   no file belongs to the builder (an ordinary user's build maps root properly);
#   the root's apt sources are the host's (the same files, or only the host's Debian mirrors);
#   the host's apt proxy settings are in the root; LANG=C.UTF-8 in /etc/default/locale;
# and that a second run is a cache hit: the same path, in under 5 s.
set -uo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
fails=0
pass() { echo "debian-rootfs-test: ok: $*"; }
fail() { echo "debian-rootfs-test: FAIL: $*"; fails=$((fails + 1)); }

tarball=$("$here/build.sh") || { echo "debian-rootfs-test: FAIL: images/debian/build.sh failed"; exit 1; }
[[ -s $tarball ]] || { echo "debian-rootfs-test: FAIL: no tarball at '$tarball'"; exit 1; }
echo "debian-rootfs-test: $tarball ($(du -m "$tarball" | cut -f1) MiB)"
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
tar --numeric-owner -tvf "$tarball" >"$work/list" || { fail "tar cannot list $tarball"; exit 1; }
entry() { awk -v p="$1" '$6 == p' "$work/list"; }   # the listing line of one path
extract() { tar -xOf "$tarball" "$1" 2>/dev/null; }

# os-release: in Debian /etc/os-release is a symlink to ../usr/lib/os-release.
os=$(entry ./etc/os-release)
if [[ $os == l* ]]; then
    target=$(awk '{print $8}' <<<"$os")
    os_text=$(extract "./usr/lib/${target##*/}")
else
    os_text=$(extract ./etc/os-release)
fi
[[ -n $os ]] && grep -qx 'VERSION_ID="12"' <<<"$os_text" \
    && pass './etc/os-release: VERSION_ID="12"' || fail "./etc/os-release missing or not VERSION_ID=\"12\": '$os' $(grep VERSION_ID <<<"$os_text")"

bash_line=$(entry ./usr/bin/bash)
[[ $bash_line == -rwxr-xr-x\ 0/0\ * ]] && pass "./usr/bin/bash 0755 0/0" || fail "./usr/bin/bash: '$bash_line'"
sudo_line=$(entry ./usr/bin/sudo)
[[ $sudo_line == -rwsr-xr-x\ 0/0\ * ]] && pass "./usr/bin/sudo 4755 0/0" || fail "./usr/bin/sudo is not 4755 0/0: '$sudo_line'"

# An ordinary user's build must not leak the user's ids into the tarball.
me=$(id -u)
if ((me != 0)); then
    mine=$(awk -v u="$me" '{split($2, o, "/")} o[1] == u || o[2] == u' "$work/list" | head -n 3)
    [[ -z $mine ]] && pass "no file belongs to uid/gid $me (the builder)" || fail "files owned by the builder ($me): $mine"
fi
odd=$(awk '{split($2, o, "/")} o[1] >= 1000 && o[1] != 65534' "$work/list" | head -n 3)
[[ -z $odd ]] && pass "every owner is a system account" || fail "files with non-system owners: $odd"

# apt sources: each file in the root is the host's file of the same name (same bytes), or the
# generated debian.sources, whose mirrors the host's apt uses.
eval "$(apt-config shell sourcelist Dir::Etc::sourcelist/f sourceparts Dir::Etc::sourceparts/d)"
srcs=$(awk '$6 ~ /^\.\/etc\/apt\/sources\.list(\.d\/.+\.(list|sources))?$/ && $1 ~ /^-/ {print $6}' "$work/list")
[[ -n $srcs ]] || fail "no apt sources in the root"
for s in $srcs; do
    host_file=$([[ $s == ./etc/apt/sources.list ]] && echo "$sourcelist" || echo "${sourceparts%/}/${s##*/}")
    if [[ -f $host_file ]] && cmp -s <(extract "$s") "$host_file"; then
        pass "$s: the same as the host's $host_file"
    elif [[ $s == */debian.sources || $s == */uvm-debian.sources ]]; then
        uris=$(extract "$s" | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' | sed '/^$/d')
        ok=1
        for u in $uris; do
            cat "$sourcelist" "$sourceparts"/*.list "$sourceparts"/*.sources 2>/dev/null | grep -qF -- "${u%/}" || { ok=0; fail "$s: mirror $u is not in the host's sources"; }
        done
        ((ok)) && pass "$s: generated from the host's mirrors ($(paste -sd' ' <<<"$uris"))"
    else
        fail "$s: not the host's $host_file"
    fi
done
mapfile -t proxies < <(apt-config dump | grep -E '^Acquire::(http|https|ftp)::Proxy(::[^ ]+)? ' | grep -v ' "";$' || true)
if ((${#proxies[@]})); then
    conf=$(tar -xOf "$tarball" --wildcards './etc/apt/apt.conf.d/*' 2>/dev/null)
    for p in "${proxies[@]}"; do
        grep -qF -- "${p%;}" <<<"$conf" && pass "proxy setting in the root: $p" || fail "the root's apt lacks the host's proxy setting $p"
    done
else
    pass "the host's apt has no proxy settings (nothing to copy)"
fi

locale=$(extract ./etc/default/locale)
grep -qx 'LANG=C.UTF-8' <<<"$locale" && pass "/etc/default/locale: LANG=C.UTF-8" || fail "/etc/default/locale: '$locale'"

start=$(date +%s%N)
again=$("$here/build.sh" 2>"$work/again.err")
ms=$((($(date +%s%N) - start) / 1000000))
if [[ $again == "$tarball" ]] && grep -q 'cached' "$work/again.err" && ((ms < 5000)); then
    pass "second run: a cache hit in $ms ms, same path"
else
    fail "second run: '$again' in $ms ms ($(cat "$work/again.err"))"
fi

((fails == 0)) && { echo "debian-rootfs-test: all passed"; exit 0; }
echo "debian-rootfs-test: $fails failed"
exit 1
