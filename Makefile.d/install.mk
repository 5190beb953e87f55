# Installing uvm like any other tool (included by the top Makefile).
#   make install [PREFIX=/usr/local] [DESTDIR=...]   PREFIX=~/.local works without root
#   make uninstall [PREFIX=...] [DESTDIR=...]         removes exactly what install listed
#   make deb                                          uvm_VERSION_amd64.deb in this folder
# Layout under PREFIX:
#   bin/uvm, bin/uvmd
#   share/uvm/kernel/{bzImage,release}, share/uvm/images/{initramfs.cpio,busybox.ext4}: an
#     installed uvm boots these (Paths.installedShare); ~/.cache/uvm stays for development builds
#   share/uvm/recipes/: the distribution recipes `uvm install` runs (images/lib.sh, images/debian, images/debian-docker)
#   share/uvm/version, share/uvm/manifest (sha256 of every file above: `uvm doctor` checks them)
#   share/bash-completion/completions/uvm, share/zsh/site-functions/_uvm,
#   share/fish/vendor_completions.d/uvm.fish, share/man/man1/uvm*.1,
#   lib/systemd/user/uvmd.{service,socket} (ExecStart names PREFIX/bin/uvmd)
VERSION      ?= 0.1.0
PREFIX       ?= /usr/local
DESTDIR      ?=
DEB_ARCH     := amd64
DEB          := uvm_$(VERSION)_$(DEB_ARCH).deb
SHARE         = $(DESTDIR)$(PREFIX)/share/uvm
MANUAL_DIR   := .build/manual

.PHONY: install uninstall deb deb-name manual version-file

# What `uvm --version` says: the version and the commit it was built from.
version-file:
	@mkdir -p $(BIN)
	@commit=$$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown); \
	  git diff --quiet HEAD -- 2>/dev/null || commit="$$commit-dirty"; \
	  echo "$(VERSION) (git $$commit)" >$(BIN)/uvm-version.tmp && mv $(BIN)/uvm-version.tmp $(BIN)/uvm-version

# One man page per command and subcommand, from the argument parser's own description of them.
# The plugin writes them under .build/plugins (its own choice of folder); they are copied out.
manual: build
	$(SWIFT) package --allow-writing-to-package-directory generate-manual --configuration $(CONFIG) --multi-page \
	  >.build/manual.log 2>&1 || { cat .build/manual.log; exit 1; }
	rm -rf $(MANUAL_DIR) && mkdir -p $(MANUAL_DIR)
	cp $$(find .build/plugins -type d -path '*GenerateManual*' -name uvm | head -n 1)/*.1 $(MANUAL_DIR)/

install: build kernel images manual
	scripts/install.sh install "$(DESTDIR)" "$(PREFIX)" "$(BIN)" "$$(cat .build/kernel-dir)" "$$(cat .build/images-dir)" "$(MANUAL_DIR)"

uninstall:
	scripts/install.sh uninstall "$(DESTDIR)" "$(PREFIX)"

# A Debian package of the same layout under /usr (dpkg-deb; no root needed to build it).
deb: build kernel images manual
	rm -rf .build/deb && mkdir -p .build/deb
	scripts/install.sh install "$(CURDIR)/.build/deb" /usr "$(BIN)" "$$(cat .build/kernel-dir)" "$$(cat .build/images-dir)" "$(MANUAL_DIR)"
	scripts/make-deb.sh .build/deb "$(VERSION)" "$(DEB_ARCH)" "$(DEB)"

deb-name:
	@echo $(DEB)
