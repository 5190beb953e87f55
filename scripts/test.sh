#!/usr/bin/env bash
# `make test`'s runner. uvm is used from ordinary accounts (qemu:///session), so that is what the
# end-to-end tests exercise:
#   as an ordinary user: every test, as that user.
#   as root (CI): the unit tests and the tests that need root (AccountTests: a second account,
#     qemu:///system) as root, then the end-to-end suite as the account `uvmtest` (groups kvm and
#     libvirt; scripts/test-accounts.sh). That account may not be able to read the checkout (a
#     clone under /root), so what it runs is copied to a staging folder first.
# Environment (from the Makefile): SWIFT, TEST_FLAGS, TEST_HOME, TEST_LOG, UVM_BIN, UVM_KERNEL,
# UVM_IMAGES; TEST_ONLY=REGEX runs only the tests it matches (e.g. 'NetworkTests|AccountTests').
# Exit status: the first failing phase's.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${SWIFT:=swift}" "${TEST_FLAGS:=}" "${TEST_HOME:?}" "${TEST_LOG:?}" "${UVM_BIN:?}" "${UVM_KERNEL:?}" "${UVM_IMAGES:?}"
# A hung run must end: each phase has its own bound.
BOUND=${TEST_BOUND:-3600}
E2E='EndToEndTests\.EndToEnd'
only=()
[[ -n ${TEST_ONLY:-} ]] && only=(--filter "$TEST_ONLY")
mkdir -p "$(dirname "$TEST_LOG")"
: >"$TEST_LOG"

# Whatever a phase left running (its uvmd and VM) is stopped: `uvm stop`, then uvmd itself.
stop_uvmd() {  # HOME_DIR [setpriv args...]
    local home=$1; shift
    "$@" env UVM_HOME="$home" "$UVM_BIN/uvm" stop >/dev/null 2>&1
    local lock=$home/state/uvmd.lock
    [[ -f $lock ]] && ! flock -n "$lock" true 2>/dev/null && kill "$(cat "$lock")" 2>/dev/null
    return 0
}

if (($(id -u) != 0)); then
    rm -rf "$TEST_HOME"
    UVM_TEST_HOME=$TEST_HOME timeout "$BOUND" $SWIFT test $TEST_FLAGS "${only[@]}" 2>&1 | tee -a "$TEST_LOG"
    rc=${PIPESTATUS[0]}
    stop_uvmd "$TEST_HOME"
    ((rc == 0)) || { scripts/test-summary.sh "$TEST_LOG"; exit "$rc"; }
    exit 0
fi

scripts/test-accounts.sh
user=uvmtest
user_home=$(getent passwd "$user" | cut -d: -f6)
as_user=(setpriv --reuid="$user" --regid="$user" --init-groups)

# The test code, built once (debug) for both phases.
$SWIFT build --build-tests $TEST_FLAGS || exit 1
bundle=$($SWIFT build --show-bin-path $TEST_FLAGS)/uvmPackageTests.xctest
[[ -x $bundle ]] || { echo "test: no test bundle at $bundle" >&2; exit 1; }

stage=$TEST_HOME-stage
user_test_home=$TEST_HOME-$user
rm -rf "$TEST_HOME" "$stage" "$user_test_home"
mkdir -p "$stage"/{bin,kernel,images,tests,fixtures}
cp "$UVM_BIN"/{uvm,uvmd} "$stage/bin/"
cp "$UVM_KERNEL" "$stage/kernel/bzImage"
vmlinux=$(dirname "$UVM_KERNEL")/vmlinux
[[ -s $vmlinux ]] && cp "$vmlinux" "$stage/kernel/vmlinux"
cp "$(dirname "$UVM_KERNEL")/release" "$stage/kernel/release" 2>/dev/null || true
cp --sparse=always "$UVM_IMAGES"/* "$stage/images/"
cp "$bundle" "$stage/tests/"
cp Tests/EndToEndTests/Fixtures/* "$stage/fixtures/"
cp scripts/setup.sh "$stage/"
# `uvm install` looks for its recipes in images/ next to its binary, which here is $stage/images,
# the built images: the recipes go to $stage/recipes, named by UVM_RECIPES.
cp -r images "$stage/recipes"
chmod -R a+rX "$stage"
install -d -o "$user" -g "$user" -m 700 "$user_test_home"

# Phase 1 runs the unit suites side by side, then each heavy root-only suite alone: the spawn
# soak (70,000 processes) and the accounts' VMs would starve the unit tests' time bounds.
heavy=('EndToEndTests\.AccountTests' 'GuestAgentTests\.SpawnSoakTests')
run_root() {  # swift test arguments...
    UVM_TEST_HOME=$TEST_HOME UVM_TEST_STAGE=$stage UVM_TEST_USER=$user UVM_TEST_OTHER_USER=uvmtest2 \
        timeout "$BOUND" $SWIFT test --skip-build $TEST_FLAGS "$@" 2>&1 | tee -a "$TEST_LOG"
    return "${PIPESTATUS[0]}"
}
echo "test: phase 1 of 2: unit tests and root-only tests, as root" | tee -a "$TEST_LOG"
rc1=0
run_root --skip "$E2E" --skip "${heavy[0]}" --skip "${heavy[1]}" "${only[@]}" || rc1=$?
for suite in "${heavy[@]}"; do
    [[ -z ${TEST_ONLY:-} || $suite =~ $TEST_ONLY ]] || continue
    run_root --filter "$suite"
    rc=$?
    ((rc1 != 0)) || rc1=$rc
done
stop_uvmd "$TEST_HOME"
# The account tests start $user's session libvirtd and virtlogd with an XDG_CONFIG_HOME of their
# own, deleted when they end; those daemons linger (120 s idle timeout) and phase 2 would reuse them
# (its first VMs' state under a deleted directory). Phase 2 starts its own.
for d in libvirtd virtlogd; do pkill -u "$user" -x "$d" || true; done
for _ in {1..50}; do pgrep -u "$user" -x 'libvirtd|virtlogd' >/dev/null || break; sleep 0.2; done

echo "test: phase 2 of 2: the end-to-end suite as $user (qemu:///session)" | tee -a "$TEST_LOG"
(cd "$stage" && timeout "$BOUND" "${as_user[@]}" env -i \
    HOME="$user_home" USER="$user" LOGNAME="$user" SHELL=/bin/bash LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    UVM_BIN="$stage/bin" UVM_KERNEL="$stage/kernel/bzImage" UVM_IMAGES="$stage/images" UVM_RECIPES="$stage/recipes" \
    UVM_TEST_HOME="$user_test_home" UVM_TEST_FIXTURES="$stage/fixtures" \
    "$stage/tests/uvmPackageTests.xctest" --testing-library swift-testing --filter "$E2E${TEST_ONLY:+.*($TEST_ONLY)}") 2>&1 | tee -a "$TEST_LOG"
rc2=${PIPESTATUS[0]}
stop_uvmd "$user_test_home" "${as_user[@]}"

if ((rc1 != 0 || rc2 != 0)); then
    echo "test: phase 1 (root) exit $rc1, phase 2 ($user) exit $rc2"
    scripts/test-summary.sh "$TEST_LOG"
    ((rc1 != 0)) && exit "$rc1"
    exit "$rc2"
fi
