# uvm: `make run` and `make test` do everything on a fresh Debian/Ubuntu machine.
# Set-up (packages, libvirtd), the Swift build, the kernel and the images are each cached, so
# repeating a target is cheap.

SWIFT        ?= swift
CONFIG       ?= release
BIN          := .build/$(CONFIG)
UVM_INIT     ?= $(BIN)/uvm-init
ARGS         ?=
# Tests run on the same binaries that `make run` uses.
TEST_FLAGS   ?=

.PHONY: all setup build kernel images run test unit-test bench doctor clean help

help:
	@echo "make run [ARGS='exec -- uname -a']   set up, build, then run uvm (a shell without ARGS)"
	@echo "make test                           set up, build, then run all tests (boots the VM)"
	@echo "make bench                          benchmarks; results in bench-results/"
	@echo "make setup | build | kernel | images | doctor | clean"

all: build kernel images

include Makefile.d/host.mk

build:
	$(SWIFT) build -c $(CONFIG)

# The agent is part of the initramfs, so images follow the build.
images: build

run: setup build kernel images
	@$(BIN)/uvm $(ARGS)

test: setup build kernel images
	UVM_BIN=$(abspath $(BIN)) $(SWIFT) test -c $(CONFIG) $(TEST_FLAGS)

# Without a VM: protocol, 9P server, libvirt XML.
unit-test: build
	$(SWIFT) test -c $(CONFIG) --skip EndToEndTests $(TEST_FLAGS)

bench: setup build kernel images
	UVM_BIN=$(abspath $(BIN)) python3 scripts/bench.py

doctor: build
	@$(BIN)/uvm doctor

clean:
	rm -rf .build
