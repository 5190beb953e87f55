#!/bin/sh
# Fuzzes the 9P decoders and server session with libFuzzer (+ AddressSanitizer) for N seconds.
#   scripts/fuzz-9p.sh [seconds]      (default 60)
# Seeds: Tests/Plan9Tests/corpus (recorded client traffic). New inputs go to .build/fuzz/corpus,
# crashes to .build/fuzz/artifacts; copy a reproducer into the seed corpus once fixed, and
# `uvm-9p fuzz-replay FILE` runs it without libFuzzer.
set -eu
secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
scratch="$root/.build/fuzz"
# With UVM_FUZZ, uvm-9p's main hands the command line to libFuzzer (LLVMFuzzerRunDriver), which
# calls Plan9Fuzz.testOneInput for each input. -sanitize=fuzzer would link libFuzzer's own main()
# as well, so the coverage flags are given by hand and libFuzzer is linked without its main.
rm -f "$scratch/debug/uvm-9p"
swiftc=$(command -v swiftc)
fuzzer_lib=$(ls "$(dirname "$swiftc")"/../lib/clang/*/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a | head -n 1)
swift build --package-path "$root" --scratch-path "$scratch" --product uvm-9p \
    -Xswiftc -sanitize=address \
    -Xswiftc -sanitize-coverage=edge,trace-cmp,inline-8bit-counters,pc-table \
    -Xswiftc -DUVM_FUZZ \
    -Xlinker "$fuzzer_lib" -Xlinker -lstdc++ 2>&1 | grep -v 'Cannot export local symbol' || true
test -x "$scratch/debug/uvm-9p"
mkdir -p "$scratch/corpus" "$scratch/artifacts"
# Swift's own crash backtracer trips AddressSanitizer; libFuzzer reports the crash itself.
export SWIFT_BACKTRACE=enable=no
exec "$scratch/debug/uvm-9p" \
    -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$scratch/artifacts/" \
    "$scratch/corpus" "$root/Tests/Plan9Tests/corpus"
