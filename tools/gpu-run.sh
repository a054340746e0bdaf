#!/usr/bin/env bash
# gpu-run.sh [tests|bench|compare|train|precision|profile|all] - run on the GPU machine (the `device`
# tool), from the repository root, with .gpu/bundle.tar.xz carried there
# (tools/gpu-bundle.sh made it here).  Writes its logs and results to $OUT
# (or ./gpu-out without one):
#   tests  every test binary, the CUDA variants included: tests.log
#   bench  bench_torch.py and bench_engine on cuda (cuDNN's figures in FP32
#          and TF32, each against the engine's own, and the engine's FP32
#          again with --recurrence fused; a training step against
#          cuDNN's), the fused recurrence again in the bundle's
#          variants (rows32, rows16, nooverlap), the server's /generate
#          at 64 streams with --device cuda: torch.json, engine.json,
#          engine-NAME.json for each variant, server.log and
#          RESULTS.md (for bench/RESULTS.md)
#   train  the shipped sentiment recipe on the GPU, and a few Austen
#          steps for speed: train.log
#   precision  what TF32 and BF16 cost: Austen's bits per character on Persuasion
#          and the sentiment model's accuracy on its 200 test sentences,
#          fp32 against tf32 and bf16: precision.log
#   compare  bench_engine and every variant the bundle holds (other builds
#          of it: the tile variants and RRN_BENCH_VARIANTS's,
#          tools/gpu-bundle.sh) in every mode, on the same
#          weights, one after the other, with cuDNN's and PyTorch's figures:
#          a table of every figure side by side, compare.txt
#   profile  bench_engine on cuda under CUPTI (tools/cupti_trace.c): every
#          distinct copy and how often it ran (nothing of the model may be
#          copied once a step), and per recorded graph how much of its
#          kernels' time ran at once on several streams: profile.log
# all runs the first four: about 10 minutes by estimate, at the device
# tool's limit for one call, so run them one call each (each fits).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
root=/tmp/rrn
rm -rf "$root"
mkdir -p "$root" && xz -dc .gpu/bundle.tar.xz | tar -C "$root" -xf - || {
    echo "gpu-run.sh: cannot unpack .gpu/bundle.tar.xz (carry .gpu; tools/gpu-bundle.sh makes it)" >&2
    exit 1
}
export LD_LIBRARY_PATH="$root/lib:/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A link, so that it loads the CUDA library beside its target.
ln -sfn "$root/build/cuda/rrnserve" ./rrnserve
# The models' recipes read their data from ../shared/data.
if [ ! -e ../shared/data ] && [ -d "$root/data" ]; then
    mkdir -p ../shared && ln -s "$root/data" ../shared/data
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ./rrnserve --version
    ldd ./rrnserve "$root/build/cuda/librrnserve-cuda.so" | grep 'not found'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

run_tests() {
    # The GPU's own tests first, so a short run still has them.
    for t in test_fixtures test_gradcheck test_engine test_optim test_train test_faults; do
        RRN_TEST_FILTER='*cuda*' RRN_BIN="$PWD/rrnserve" "$root/build/cuda/tests/$t" >"$out/$t.log" 2>&1
        echo "$t: exit $?, $(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+' "$out/$t.log" | tr '\n' ' ')"
    done
    tests/run_tests.sh "$root/build/cuda" "$PWD/rrnserve" >"$out/tests.log" 2>&1
    tail -n 1 "$out/tests.log"
}

run_bench() {
    bench/run_bench_gpu.sh "$root/build/cuda/bench" "$out"
}

run_train() {
    {
        time ./rrnserve train --config models/sentiment.json --device cuda --out /tmp/sentiment-gpu.safetensors
        ./rrnserve run /tmp/sentiment-gpu.safetensors --jsonl tests/fixtures/data/sentiment.test.jsonl --device cuda |
            head -n 3
        time ./rrnserve train --config models/austen.json --device cuda --steps 40 --log_every 10 --valid_every 0 \
            --out /tmp/austen-gpu.safetensors
    } >"$out/train.log" 2>&1
    tail -n 20 "$out/train.log"
}

run_precision() {
    tools/precision.sh ./rrnserve "$out" >"$out/precision.log" 2>&1
    cat "$out/precision.log"
}

run_profile() {
    local dir
    dir=$(mktemp -d)
    python3 bench/bench_torch.py "$dir" cuda >/dev/null &&
        CUDA_INJECTION64_PATH="$root/build/cuda/tools/libcupti_trace.so" \
            "$root/build/cuda/bench/bench_engine" "$dir" cuda >"$out/profile.json" 2>"$out/profile.log"
    cat "$out/profile.json" "$out/profile.log"
    rm -rf "$dir"
}

run_compare() {
    local dir v
    dir=$(mktemp -d)
    python3 bench/bench_torch.py "$dir" cuda >"$out/torch.json" &&
        "$root/build/cuda/bench/bench_engine" "$dir" cuda >"$out/engine-main.json"
    for v in "$root"/build/cuda/bench/variants/*/bench/bench_engine; do
        [ -x "$v" ] && "$v" "$dir" cuda >"$out/engine-$(basename "${v%/bench/bench_engine}").json"
    done
    rm -rf "$dir"
    python3 - "$out"/torch.json "$out"/engine-*.json <<'PY' | tee "$out/compare.txt"
import json, os, sys
runs = []
for path in sys.argv[1:]:
    try:
        runs.append((os.path.basename(path)[:-5], json.load(open(path))))
    except (OSError, ValueError):
        print("%s: no figures" % path)
keys = []
for _, r in runs:
    keys += [k for k, v in r.items() if isinstance(v, float) and k not in keys]
print("%-28s" % "figure" + "".join("%16s" % name for name, _ in runs))
for k in keys:
    print("%-28s" % k + "".join("%16s" % ("%.6g" % r[k] if isinstance(r.get(k), float) else "-") for _, r in runs))
PY
}

case $what in
tests) run_tests ;;
compare) run_compare ;;
bench) run_bench ;;
train) run_train ;;
precision) run_precision ;;
profile) run_profile ;;
all) run_tests; run_bench; run_train; run_precision ;;
*) echo "usage: gpu-run.sh [tests|bench|compare|train|precision|profile|all]" >&2; exit 2 ;;
esac
