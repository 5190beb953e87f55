# Host set-up, guest kernel and guest images (included by the top Makefile).
# scripts/kernel.sh and the image recipes under images/ cache their outputs under
# $XDG_CACHE_HOME/uvm (default ~/.cache/uvm), outside the clone: kernel/current/{bzImage,config,release}
# and images/current/{initramfs.cpio,busybox.ext4} (images/build.sh), rootfs/debian/debian.tar.zst
# (images/debian/build.sh, for `uvm install debian`).
UVM_INIT ?= .build/release/uvm-init

.PHONY: setup kernel images debian-rootfs debian-rootfs-test
setup:
	scripts/setup.sh
kernel:
	@mkdir -p .build
	scripts/kernel.sh >.build/kernel-dir.out && tail -n 1 .build/kernel-dir.out >.build/kernel-dir
images:
	@mkdir -p .build
	images/build.sh $(UVM_INIT) >.build/images-dir
# The Debian 12 root file system tarball (mmdebstrap; minutes the first time, then cached).
# Not part of `make test` yet: debian-rootfs-test checks it on its own.
debian-rootfs:
	@mkdir -p .build
	images/debian/build.sh >.build/debian-rootfs
debian-rootfs-test:
	images/debian/test.sh
