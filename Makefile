# uvm: `make run` and `make test` do everything on a fresh Debian/Ubuntu machine.
# Set-up (packages, libvirtd), the Swift build, the kernel and the images are each cached, so
# repeating a target is cheap.

# bash: the test recipe needs the test run's own status out of a pipe (PIPESTATUS).
SHELL        := /bin/bash
SWIFT        ?= swift
CONFIG       ?= release
BIN          := .build/$(CONFIG)
# The agent goes into the initramfs stripped: half the size, and the guest unpacks it at every boot.
UVM_INIT     ?= $(BIN)/uvm-init-stripped
ARGS         ?=
# The test code builds in debug (release objects cannot serve it: testing needs other flags);
# the end-to-end tests drive the release binaries that `make run` uses (UVM_BIN).
TEST_FLAGS   ?=

.PHONY: all setup build kernel images run test unit-test bench fuzz doctor clean help

help:
	@echo "make run [ARGS='exec -- uname -a']   set up, build, then run uvm (a shell without ARGS)"
	@echo "make test                           set up, build, then run all tests (boots the VM)"
	@echo "make bench                          benchmarks; results in bench-results/"
	@echo "make debian-rootfs                  the Debian 12 root file system tarball (make debian-rootfs-test checks it)"
	@echo "make install [PREFIX=/usr/local] [DESTDIR=]   uvm, uvmd, kernel, images, completions, man pages, user units"
	@echo "make uninstall | deb                  remove what install put there | uvm_VERSION_amd64.deb"
	@echo "make setup | build | kernel | images | doctor | clean"

all: build kernel images

include Makefile.d/host.mk
include Makefile.d/install.mk

build: version-file
	$(SWIFT) build -c $(CONFIG)
	strip -o $(BIN)/uvm-init-stripped $(BIN)/uvm-init

# The agent is part of the initramfs, so images follow the build.
images: build

run: setup build kernel images
	@$(BIN)/uvm $(ARGS)

# The tests keep uvm's state (and their VM) in TEST_HOME; whatever they leave running is stopped.
# One per checkout, so that worktrees can test side by side. As root, the end-to-end suite runs as
# the ordinary account `uvmtest` (scripts/test.sh says how); as a user, everything runs as that user.
TEST_HOME    ?= /tmp/uvm-test-$(shell id -u)-$(shell echo $(CURDIR) | cksum | cut -d" " -f1)
# A failed run repeats its issues at the end (CI shows only the tail); the whole output stays here.
TEST_LOG     ?= .build/test.log

test: setup build kernel images
	@SWIFT="$(SWIFT)" TEST_FLAGS="$(TEST_FLAGS)" TEST_HOME=$(TEST_HOME) TEST_LOG=$(TEST_LOG) \
	  UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) \
	  scripts/test.sh
	@re='$(TEST_ONLY)'; if [[ -z $$re || install =~ $$re ]]; then scripts/test-install.sh; fi
	scripts/fuzz-9p.sh $(FUZZ_SECONDS)
	scripts/lint-workflows.sh

# The 9P decoders and server under libFuzzer + ASan, bounded (make test runs it too).
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz-9p.sh $(FUZZ_SECONDS)

# The GitHub workflows and action.yml: schema, bash -n on run: blocks, zizmor (make test runs it too).
.PHONY: lint
lint:
	scripts/lint-workflows.sh

# Without a VM: protocol, 9P server, libvirt XML.
unit-test:
	$(SWIFT) test --skip EndToEndTests $(TEST_FLAGS)

bench: setup build kernel images
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench_9p.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench_transfer.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench_distros.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench_memory.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) python3 scripts/bench_mount.py
	UVM_KERNEL=$$(cat .build/kernel-dir)/bzImage UVM_IMAGES=$$(cat .build/images-dir) UVM_BIN=$(abspath $(BIN)) UVM_RECIPES=$(CURDIR)/images python3 scripts/bench_linux.py

doctor: build
	@$(BIN)/uvm doctor

clean:
	rm -rf .build
