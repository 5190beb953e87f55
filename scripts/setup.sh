#!/usr/bin/env bash
# Host set-up for building and running uvm on Debian 12 (bookworm).
# Idempotent; when everything is in place it only prints "setup: ok".
#   (a) installs the Debian packages uvm needs (as root; else prints the command)
#   (b) without systemd, starts virtlogd and libvirtd (as root)
#   (c) makes /dev/kvm group kvm, mode 660 (as root; else prints the command)
#   (d) as an ordinary user: checks group kvm and that libvirt's per-user daemon starts
#   (e) subordinate uid/gid ranges (/etc/subuid, /etc/subgid) for the user who builds the Debian
#       root file system without root (images/debian/build.sh: mmdebstrap's unshare mode): as
#       root, adds them for the user who ran sudo; as that user, prints the command. A note,
#       not an error: only `make debian-rootfs` needs them.
set -euo pipefail

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

packages=(
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev libvirt-clients
    qemu-system-x86 qemu-utils
    e2fsprogs busybox-static cpio
    make gcc libc6-dev bc bison flex patch libelf-dev libssl-dev xz-utils linux-source-6.1
    diod libglib2.0-dev socat tmux expect curl pkg-config
    mmdebstrap uidmap zstd
    libarchive-tools  # bsdtar: ArchiveTests check rootfs tarballs against libarchive both ways
    python3-venv      # scripts/lint-workflows.sh (make test) puts its linters from PyPI in a venv
    libfuse3-dev fuse3  # `uvm mount`: libfuse3, and the setuid fusermount3 that mounts for ordinary users
)
is_root=0
[[ $(id -u) == 0 ]] && is_root=1

# --- (a) Debian packages ----------------------------------------------------
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: uvm's set-up supports Debian (12, bookworm) only; install the equivalents of: ${packages[*]}"
declare -A installed=()
while read -r name status; do
    [[ $status == installed ]] && installed[$name]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${packages[@]}" 2>/dev/null || true)
missing=()
for p in "${packages[@]}"; do
    [[ -n ${installed[$p]:-} ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    if ((!is_root)); then
        log "missing Debian packages; run:"
        echo "sudo apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when some package has no install candidate.
    need_update=0
    for p in "${missing[@]}"; do
        if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            need_update=1
            break
        fi
    done
    if ((need_update)); then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed (network? /etc/apt/sources.list?)"
    fi
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed; run: apt-get install -y --no-install-recommends ${missing[*]}"
fi

# --- (c) /dev/kvm permissions -----------------------------------------------
# Done before starting libvirtd. libvirt probes QEMU's capabilities as its
# unprivileged qemu user and records whether KVM was usable. With /dev/kvm
# root-only (crw------- root root, which is what a system without udev rules
# gives), every new connection finds that record stale ("KVM was enabled when
# probing ..., but it is not available now") and probes QEMU again:
# `virsh version` takes ~4 s and a domain create ~55 s instead of ~30 ms and
# ~0.5 s. Group kvm, mode 660 is what udev does on a normal distribution.
if [[ -e /dev/kvm ]]; then
    kvm_perm=$(stat -c '%G %a' /dev/kvm)
    if [[ $kvm_perm != "kvm 660" && $kvm_perm != "kvm 666" ]]; then
        if ((is_root)); then
            if ! getent group kvm >/dev/null; then
                log "groupadd --system kvm"
                groupadd --system kvm
            fi
            log "chgrp kvm /dev/kvm && chmod 660 /dev/kvm (was: $kvm_perm)"
            chgrp kvm /dev/kvm && chmod 660 /dev/kvm
        else
            log "/dev/kvm is '$kvm_perm' (libvirt then re-probes QEMU on every connection); run:"
            echo "sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm"
            exit 1
        fi
    fi
fi

# --- (c2) /dev/fuse for everyone ----------------------------------------------
# `uvm mount` (libfuse3) opens /dev/fuse as the user and has the setuid fusermount3 mount it;
# libfuse does not fall back to fusermount3 when the open fails. udev makes it crw-rw-rw- on a
# normal distribution; without udev it is root's alone.
if [[ -c /dev/fuse ]]; then
    fuse_perm=$(stat -c '%a' /dev/fuse)
    if [[ $fuse_perm != 666 ]]; then
        if ((is_root)); then
            log "chmod 666 /dev/fuse (was: $fuse_perm)"
            chmod 666 /dev/fuse
        else
            log "/dev/fuse is mode $fuse_perm: \`uvm mount\` cannot work for ordinary users; run:"
            echo "sudo chmod 666 /dev/fuse"
        fi
    fi
fi

# --- (d) an ordinary account: group kvm, and libvirt's per-user daemon ----------
# qemu:///session runs QEMU as the user, so the user needs /dev/kvm through group kvm (a group
# added with usermod counts from the next login). libvirt starts the per-user daemon itself,
# systemd or not; asking it once here also has it probe QEMU's capabilities before the first VM.
if ((!is_root)); then
    me=$(id -un)
    if [[ -e /dev/kvm && ! ( -r /dev/kvm && -w /dev/kvm ) ]]; then
        if id -nG | tr ' ' '\n' | grep -qx kvm; then
            log "$me is in group kvm and /dev/kvm is $(stat -c '%G %a' /dev/kvm), yet it cannot be opened read-write (an ACL?)"
        elif id -nG "$me" | tr ' ' '\n' | grep -qx kvm; then
            log "$me is in group kvm, but this login started before that: log in again (or run \`newgrp kvm\`), then run this again"
        else
            log "$me is not in group kvm (needed for /dev/kvm); run once, then log in again:"
            echo "sudo usermod -aG kvm,libvirt $me"
        fi
        exit 1
    fi
    if ! out=$(timeout 120 virsh -c qemu:///session uri 2>&1); then
        log "libvirt's per-user daemon does not answer \`virsh -c qemu:///session uri\`: $out"
        log "see ~/.cache/libvirt/libvirtd.log"
        exit 1
    fi
fi

# --- (b) libvirt daemons without systemd --------------------------------------
# Debian's packages rely on systemd units to start the daemons. Without systemd
# (containers, CI machines) nothing starts them, so start them here. Non-root
# users run qemu:///session, whose daemon libvirt starts by itself.
if [[ $(cat /proc/1/comm 2>/dev/null) != systemd ]] && ((is_root)); then
    started=0
    if ! pgrep -x virtlogd >/dev/null; then
        log "starting virtlogd -d"
        virtlogd -d || die "virtlogd -d failed"
        started=1
    fi
    if ! pgrep -x libvirtd >/dev/null; then
        log "starting libvirtd -d"
        libvirtd -d || die "libvirtd -d failed (see /var/log/libvirt/)"
        started=1
    fi
    if ((started)); then
        # Bounded wait until the daemon answers.
        deadline=$((SECONDS + 30))
        until timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; do
            ((SECONDS < deadline)) || die "libvirtd does not answer \`virsh -c qemu:///system version\` after 30 s (see /var/log/libvirt/)"
            sleep 0.2
        done
        log "libvirtd answers on qemu:///system"
    fi
fi

# --- (e) subordinate ids for mmdebstrap's unshare mode -------------------------
# mmdebstrap --mode=unshare maps root and the system accounts of the root file system it builds
# to the user's /etc/subuid and /etc/subgid range (65536 ids), through the setuid newuidmap and
# newgidmap (package uidmap), so the tarball gets real owners without root. adduser gives every
# account it creates such a range; accounts made otherwise may lack one.
has_range() { grep -qE "^($1|$(id -u "$1")):" "$2" 2>/dev/null; }
free_range_start() {  # the first multiple of 65536 above every range in /etc/subuid and /etc/subgid
    cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: '
        { end = $2 + $3; if (end > max) max = end }
        END { s = 100000; if (max > s) s = int((max + 65535) / 65536) * 65536; print s }'
}
subid_user=
if ((is_root)); then
    [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]] && subid_user=$SUDO_USER
else
    subid_user=$(id -un)
fi
if [[ -n $subid_user ]] && ! { has_range "$subid_user" /etc/subuid && has_range "$subid_user" /etc/subgid; }; then
    start=$(free_range_start)
    range="$start-$((start + 65535))"
    if ((is_root)); then
        log "usermod --add-subuids $range --add-subgids $range $subid_user (for mmdebstrap's unshare mode)"
        usermod --add-subuids "$range" --add-subgids "$range" "$subid_user" \
            || log "usermod failed; \`make debian-rootfs\` as $subid_user needs a range in /etc/subuid and /etc/subgid"
    else
        log "note: $subid_user has no range in /etc/subuid and /etc/subgid, which \`make debian-rootfs\` needs (mmdebstrap's unshare mode); run:"
        echo "sudo usermod --add-subuids $range --add-subgids $range $subid_user"
    fi
fi

echo "setup: ok" >&2
