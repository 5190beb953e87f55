#!/usr/bin/env bash
# After a failed `swift test`: the recorded issues again, last, so that a log cut to its tail
# (CI keeps only the end) still says which tests failed and why.
# usage: test-summary.sh LOG [MAX_LINES]
log=$1; max=${2:-200}
[ -f "$log" ] || exit 0
echo "──── failed tests and their issues (whole log: $log) ────"
# An issue line, then what follows it up to the next test event (multi-line messages, ↳ comments).
awk '/recorded an issue|^✘ Test .* failed/ { show = 1; print; next }
     /^(◇|✔|✘|Test Suite|\[[0-9]+\/[0-9]+\])/ { show = 0 }
     show { print }' "$log" | head -n "$max"
