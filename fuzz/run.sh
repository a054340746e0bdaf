#!/usr/bin/env bash
# run.sh SECONDS NAME... - run the libFuzzer targets build/fuzz/fuzz_NAME
# (make fuzz builds them) one after the other, SECONDS each, from the
# repository root, with the JSON dictionary fuzz/json.dict for the targets
# that read JSON (fuzz/http.dict for fuzz_http).  Seeds come from
# fuzz/corpus/NAME/ (never written to); what a run learns goes to
# build/fuzz/corpus/NAME/, and a crashing input to build/fuzz/crash-NAME-*.  Prints one line per target with its executions
# and exits non-zero when any target found a crash, a leak or a timeout.
set -u
cd "$(dirname "$0")/.."
secs=${1:?usage: fuzz/run.sh SECONDS NAME...}
shift
failed=0
for name in "$@"; do
    mkdir -p "build/fuzz/corpus/$name"
    log="build/fuzz/$name.log"
    dict=()
    case "$name" in
    config | safetensors | request) dict=(-dict=fuzz/json.dict) ;;
    http) dict=(-dict=fuzz/http.dict) ;;
    esac
    "build/fuzz/fuzz_$name" -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 "${dict[@]}" \
        -artifact_prefix="build/fuzz/crash-$name-" "build/fuzz/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        failed=1
        echo "fuzz $name: FAILED (exit $rc) after ${execs:-?} executions; the end of $log:"
        tail -40 "$log"
    else
        echo "fuzz $name: ${execs:-?} executions in ${secs} s, ${cov:-cov: ?}, no crash"
    fi
done
exit $failed
