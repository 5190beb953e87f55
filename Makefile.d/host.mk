# Host set-up, guest kernel and guest images (included by the top Makefile).
# The scripts cache their outputs under $XDG_CACHE_HOME/uvm (default ~/.cache/uvm),
# outside the clone: kernel/current/{bzImage,config,release} and
# images/current/{initramfs.cpio,busybox.ext4}.
UVM_INIT ?= .build/release/uvm-init

.PHONY: setup kernel images
setup:
	scripts/setup.sh
kernel:
	@mkdir -p .build
	scripts/kernel.sh >.build/kernel-dir.out && tail -n 1 .build/kernel-dir.out >.build/kernel-dir
images:
	@mkdir -p .build
	scripts/images.sh $(UVM_INIT) >.build/images-dir
