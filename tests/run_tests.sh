#!/usr/bin/env bash
# run_tests.sh BUILD_DIR RRNSERVE [TEST...] - run every cmocka test binary
# in BUILD_DIR/tests (or the TESTs named, e.g. test_server) from the
# repository root and print one closing line "N passed, N failed, N
# skipped" over all of them.  Exits non-zero when any test failed or any
# binary crashed.  RRN_TEST_JOBS=N runs up to N binaries at once (default
# 1), for binaries that compute alone and time nothing (the emulated CUDA
# tests); each binary's output is printed whole, in the order named, as
# soon as it and those before it have finished, with the seconds it took.
set -u
build=$1
export RRN_BIN=$2
shift 2
tests=("$build"/tests/test_*)
[ $# -gt 0 ] && tests=("${@/#/$build/tests/}")
jobs=${RRN_TEST_JOBS:-1}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
passed=0 failed=0 skipped=0 crashed=0 started=0 reported=0
names=()

# Print the output of binary i and add up its cmocka summary lines:
# "[  PASSED  ] N test(s)." and, when there are any, "[  FAILED  ] N
# test(s), listed below:" (SKIPPED alike).
report() {
    local out rc p f s
    out=$(cat "$dir/$1.out")
    rc=$(cat "$dir/$1.rc")
    printf '%s\n' "$out"
    echo "${names[$1]}: $(cat "$dir/$1.s") s"
    count() { sed -n "s/^\[  $1 *\] \([0-9][0-9]*\) test(s).*/\1/p" <<<"$out" | head -1; }
    p=$(count PASSED); f=$(count FAILED); s=$(count SKIPPED)
    p=${p:-0}; f=${f:-0}; s=${s:-0}
    passed=$((passed + p)); skipped=$((skipped + s)); failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "CRASHED: ${names[$1]} exited with status $rc"
        crashed=$((crashed + 1)); failed=$((failed + 1))
    fi
}

# Report every finished binary whose predecessors have been reported.
flush() {
    while [ "$reported" -lt "$started" ] && [ -e "$dir/$reported.rc" ]; do
        report "$reported"
        reported=$((reported + 1))
    done
}

for t in "${tests[@]}"; do
    [ -x "$t" ] || continue
    case "$t" in *.o|*.d) continue ;; esac
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n
        flush
    done
    names[$started]=$t
    ( t0=$SECONDS; "$t" >"$dir/$started.out" 2>&1; echo $? >"$dir/$started.tmp"
      echo "$((SECONDS - t0))" >"$dir/$started.s"; mv "$dir/$started.tmp" "$dir/$started.rc" ) &
    started=$((started + 1))
done
while [ "$reported" -lt "$started" ]; do
    wait -n
    flush
done
echo "$build: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
