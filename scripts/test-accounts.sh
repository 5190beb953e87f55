#!/usr/bin/env bash
# Root only: the accounts `make test` runs uvm as. uvm is used from ordinary accounts, so the
# end-to-end tests run as one:
#   uvmtest   groups kvm and libvirt, as README tells a user to set up their own account
#   uvmtest2  no extra groups: a second user, who must not reach uvmtest's uvmd, and whom
#             `uvm doctor` must tell how to join group kvm
# Idempotent.
set -euo pipefail
log() { echo "test-accounts: $*" >&2; }
(($(id -u) == 0)) || { echo "test-accounts: needs root" >&2; exit 1; }
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt >/dev/null || groupadd --system libvirt
ensure() {
    local name=$1 groups=$2
    if ! id -u "$name" >/dev/null 2>&1; then
        log "useradd $name${groups:+ (groups $groups)}"
        useradd --create-home --shell /bin/bash ${groups:+--groups "$groups"} "$name"
    elif [[ -n $groups ]]; then
        usermod -aG "$groups" "$name"
    fi
}
ensure uvmtest kvm,libvirt
ensure uvmtest2 ""
