#!/usr/bin/env bash
# uvm-install: Debian 12 (bookworm) as `debian` plus Docker (docker.io) and rootless Podman, systemd on
# The debian recipe (images/debian/build.sh) with images/debian/packages.docker added; cached
# as ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/rootfs/debian-docker. The default user is in the
# docker group, and has a /etc/subuid range for rootless Podman.
set -euo pipefail
UVM_DEBIAN_VARIANT=docker exec "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/../debian/build.sh" "$@"
