#!/usr/bin/env bash
# make test's install checks (after the Swift suites): `make install DESTDIR=... PREFIX=/usr` lays
# out the files, the installed uvm boots its own kernel (as an ordinary account), completions and
# man pages work, `make deb` builds a package whose uvm runs from an extracted copy, `make
# uninstall` removes everything, and PREFIX=~/.local puts the user units where systemd looks.
# Run as root (it runs uvm as the test account `uvmtest`) or as an ordinary user (as itself).
# Prints "N passed, M failed"; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
ok() { echo "test-install: ok: $*"; passed=$((passed + 1)); }
bad() { echo "test-install: FAIL: $*"; failed=$((failed + 1)); }
check() {  # DESCRIPTION COMMAND...: ok when the command succeeds
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

tmp=$(mktemp -d /tmp/uvm-test-install.XXXXXX)
chmod 755 "$tmp"
as_user=()
if (($(id -u) == 0)); then
    scripts/test-accounts.sh >/dev/null
    as_user=(setpriv --reuid=uvmtest --regid=uvmtest --init-groups)
    run_user=uvmtest
    user_home=$(getent passwd uvmtest | cut -d: -f6)
else
    run_user=$(id -un)
    user_home=$HOME
fi
home=$tmp/uvm-home
stop() {
    [[ -x $tmp/root/usr/bin/uvm ]] && "${as_user[@]}" env UVM_HOME="$home" HOME="$user_home" "$tmp/root/usr/bin/uvm" stop >/dev/null 2>&1
    local lock=$home/state/uvmd.lock
    [[ -f $lock ]] && kill "$(cat "$lock")" 2>/dev/null
    rm -rf "$tmp"
}
trap stop EXIT
mkdir -p "$home"
[[ ${#as_user[@]} -eq 0 ]] || chown uvmtest: "$home"

# --- make install into a scratch root ----------------------------------------------------------
if ! make -s install DESTDIR="$tmp/root" PREFIX=/usr >"$tmp/install.log" 2>&1; then
    tail -n 30 "$tmp/install.log"
    bad "make install DESTDIR=$tmp/root PREFIX=/usr"
    echo "$passed passed, $failed failed"
    exit 1
fi
ok "make install DESTDIR=... PREFIX=/usr"
r=$tmp/root/usr
for f in bin/uvm bin/uvmd share/uvm/kernel/bzImage share/uvm/kernel/release share/uvm/images/initramfs.cpio \
    share/uvm/images/busybox.ext4 share/uvm/recipes/lib.sh share/uvm/recipes/debian/build.sh share/uvm/version \
    share/uvm/manifest share/bash-completion/completions/uvm share/zsh/site-functions/_uvm \
    share/fish/vendor_completions.d/uvm.fish share/man/man1/uvm.1 lib/systemd/user/uvmd.service lib/systemd/user/uvmd.socket; do
    [[ -s $r/$f ]] || bad "installed file $f missing"
done
ok "the layout: bin, share/uvm/{kernel,images,recipes}, completions, man pages, user units"
check "man pages for the subcommands too ($(find "$r/share/man/man1" -name '*.1' | wc -l) pages)" \
    test "$(find "$r/share/man/man1" -name '*.1' | wc -l)" -ge 10
check "the user unit starts the installed uvmd" grep -qx 'ExecStart=/usr/bin/uvmd serve' "$r/lib/systemd/user/uvmd.service"
check "the manifest lists what was installed, with sha256" \
    bash -c "cd '$tmp/root/usr' && sha256sum --quiet -c share/uvm/manifest"

# --- the installed uvm, as an ordinary account -----------------------------------------------
run_installed() {  # ARGS...: the installed uvm, without any of the build's UVM_KERNEL/UVM_IMAGES
    (cd "$tmp" && "${as_user[@]}" env -i HOME="$user_home" USER="$run_user" LOGNAME="$run_user" \
        PATH=/usr/bin:/bin:/usr/sbin:/sbin UVM_HOME="$home" UVM_VM_IDLE_TIMEOUT=5s LANG=C.UTF-8 \
        timeout 300 "$r/bin/uvm" "$@")
}
version=$(run_installed --version 2>&1)
check "uvm --version says the version and commit ($version)" grep -qE '^[0-9]+\.[0-9]+\.[0-9]+ \(git [0-9a-f]{7,}' <<<"$version"
want=$(cat "$r/share/uvm/kernel/release")
got=$(run_installed exec -- uname -r 2>"$tmp/exec.err")
if [[ -n $want && $got == "$want" ]]; then
    ok "the installed uvm boots its own kernel: uvm exec -- uname -r = $got"
else
    bad "installed uvm exec -- uname -r: '$got', expected '$want' ($(tail -n 3 "$tmp/exec.err"))"
fi
doctor=$(run_installed doctor 2>&1)
check "uvm doctor names the installed kernel and says it matches" grep -qE "install.*in $tmp/root/usr: kernel $r/share/uvm/kernel/bzImage" <<<"$doctor"
run_installed stop >/dev/null 2>&1
# A changed kernel is noticed (a half-upgraded install).
cp "$r/share/uvm/kernel/release" "$tmp/release.keep"
echo tampered >>"$r/share/uvm/kernel/release"
cp "$r/share/uvm/kernel/bzImage" "$tmp/bz.keep" && printf 'x' >>"$r/share/uvm/kernel/bzImage"
# (Its output first: doctor exits non-zero when a check fails, which pipefail would pass on.)
doctor_says() { local out; out=$(run_installed doctor 2>&1); grep -q "$1" <<<"$out"; }
check "uvm doctor says when the kernel is not the one installed with the binaries" doctor_says 'share/uvm/kernel/bzImage.* changed since'
cp "$tmp/bz.keep" "$r/share/uvm/kernel/bzImage"
cp "$tmp/release.keep" "$r/share/uvm/kernel/release"

# --- completions and man pages ----------------------------------------------------------------
check "bash completion: source <(uvm --generate-completion-script bash); complete -p uvm" \
    bash -c "source <('$r/bin/uvm' --generate-completion-script bash) && complete -p uvm >/dev/null"
check "the installed bash completion loads" bash -c "source '$r/share/bash-completion/completions/uvm' && complete -p uvm >/dev/null"
if command -v man >/dev/null; then
    check "man -l renders uvm.1" bash -c "MANWIDTH=80 man -l '$r/share/man/man1/uvm.1' 2>/dev/null | grep -q 'utility VM'"
    page=$(find "$r/share/man/man1" -name '*exec*.1' | head -n 1)
    check "man -l renders the exec page" bash -c "[[ -n '$page' ]] && MANWIDTH=80 man -l '$page' 2>/dev/null | grep -q -- '--distro'"
else
    bad "man is not installed (man-db): cannot render the pages"
fi

# --- make deb ---------------------------------------------------------------------------------
deb=$(make -s deb-name)
if make -s deb >"$tmp/deb.log" 2>&1 && [[ -s $deb ]]; then
    ok "make deb built $deb"
    info=$(dpkg-deb --info "$deb")
    check "dpkg-deb --info lists its dependencies (libvirt, QEMU, e2fsprogs)" \
        bash -c "grep -q '^ Depends:.*libvirt0.*qemu-system-x86.*e2fsprogs' <<<'$info'"
    mkdir -p "$tmp/deb-root"
    dpkg-deb -x "$deb" "$tmp/deb-root"
    check "the package's uvm --version runs from an extracted copy" \
        bash -c "env -i PATH=/usr/bin:/bin '$tmp/deb-root/usr/bin/uvm' --version | grep -q '(git '"
    check "the package's binaries need no Swift toolchain libraries" \
        bash -c "! ldd '$tmp/deb-root/usr/bin/uvm' '$tmp/deb-root/usr/bin/uvmd' | grep -qE 'libswift|libFoundation|libdispatch'"
    rm -f -- "$deb"
else
    tail -n 30 "$tmp/deb.log"
    bad "make deb"
fi

# --- make uninstall ---------------------------------------------------------------------------
if make -s uninstall DESTDIR="$tmp/root" PREFIX=/usr >"$tmp/uninstall.log" 2>&1; then
    left=$(find "$tmp/root" -mindepth 1 -not -type d | head -n 5)
    check "make uninstall leaves no file behind${left:+ (left: $left)}" test -z "$left"
    check "nor the folders it made" test -z "$(find "$tmp/root/usr/share" -mindepth 1 -type d 2>/dev/null | head -n 1)"
else
    cat "$tmp/uninstall.log"
    bad "make uninstall"
fi

# --- PREFIX in the home folder: user units where systemd --user looks ---------------------------
fake=$tmp/fakehome
mkdir -p "$fake"
kernel_dir=$(cat .build/kernel-dir) images_dir=$(cat .build/images-dir)
if HOME=$fake scripts/install.sh install "" "$fake/.local" .build/release "$kernel_dir" "$images_dir" .build/manual >/dev/null; then
    check "PREFIX=~/.local: units in ~/.local/share/systemd/user, ExecStart=~/.local/bin/uvmd" \
        grep -qx "ExecStart=$fake/.local/bin/uvmd serve" "$fake/.local/share/systemd/user/uvmd.service"
    HOME=$fake scripts/install.sh uninstall "" "$fake/.local" >/dev/null
    check "and uninstall from there leaves nothing" test -z "$(find "$fake" -mindepth 1 -not -type d | head -n 1)"
else
    bad "scripts/install.sh with PREFIX=~/.local"
fi

echo "test-install: $passed passed, $failed failed"
((failed == 0))
