#!/usr/bin/env bash
# run_tests.sh BUILD_DIR RRNSERVE [TEST...] - run every cmocka test binary
# in BUILD_DIR/tests (or the TESTs named, e.g. test_server) from the
# repository root and print one closing line "N passed, N failed, N
# skipped" over all of them.  Exits non-zero when any test failed or any
# binary crashed.
set -u
build=$1
export RRN_BIN=$2
shift 2
tests=("$build"/tests/test_*)
[ $# -gt 0 ] && tests=("${@/#/$build/tests/}")
passed=0 failed=0 skipped=0 crashed=0
for t in "${tests[@]}"; do
    [ -x "$t" ] || continue
    case "$t" in *.o|*.d) continue ;; esac
    out=$("$t" 2>&1); rc=$?
    printf '%s\n' "$out"
    # cmocka's summary lines: "[  PASSED  ] N test(s)." and, when there
    # are any, "[  FAILED  ] N test(s), listed below:" (SKIPPED alike).
    count() { sed -n "s/^\[  $1 *\] \([0-9][0-9]*\) test(s).*/\1/p" <<<"$out" | head -1; }
    p=$(count PASSED); f=$(count FAILED); s=$(count SKIPPED)
    p=${p:-0}; f=${f:-0}; s=${s:-0}
    passed=$((passed + p)); skipped=$((skipped + s)); failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "CRASHED: $t exited with status $rc"
        crashed=$((crashed + 1)); failed=$((failed + 1))
    fi
done
echo "$build: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
