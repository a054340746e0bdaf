#!/usr/bin/env bash
# run_bench_gpu.sh BENCH_DIR OUT_DIR - `make bench-gpu`: the engine on the
# GPU against PyTorch's cuDNN LSTM and GRU and its eager step loops (same
# weights and tokens: bench_torch.py writes them, bench_engine reads them),
# and the server's /generate at 64 streams with --device cuda.  Writes
# torch.json, engine.json, server.log and RESULTS.md (the table for
# bench/RESULTS.md, targets beside the figures) to OUT_DIR and prints them.
# Every other build in BENCH_DIR/variants (NAME/bench/bench_engine beside
# NAME's CUDA library: tools/gpu-bundle.sh puts the fused kernel's variants
# there, its tiles, its launches) times its fused mode too, into
# engine-NAME.json and rows of the table of their own.
# Needs a CUDA GPU and a python3 with PyTorch built for it (PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: run_bench_gpu.sh BENCH_DIR OUT_DIR}
out=${2:?usage: run_bench_gpu.sh BENCH_DIR OUT_DIR}
py=${PYTHON:-python3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$out"
"$py" bench/bench_torch.py "$dir" cuda >"$out/torch.json"
cat "$out/torch.json"
# A failing mode still leaves the figures measured before it (and the
# error) in engine.json, and the table is made of what there is.
"$bin/bench_engine" "$dir" cuda >"$out/engine.json" || echo "run_bench_gpu.sh: bench_engine failed" >&2
cat "$out/engine.json"
variants=()
for v in "$bin"/variants/*/bench/bench_engine; do
    [ -x "$v" ] || continue
    json="$out/engine-$(basename "${v%/bench/bench_engine}").json"
    "$v" "$dir" cuda fused >"$json" || echo "run_bench_gpu.sh: $v failed" >&2
    cat "$json"
    variants+=("$json")
done
PYTHON="$py" BENCH_DEVICE=cuda BENCH_CLIENTS=64 bench/run_bench_server.sh "$bin/loadgen" >"$out/server.log" 2>&1 ||
    echo "run_bench_gpu.sh: the server benchmark failed (see $out/server.log)" >&2
"$py" bench/gpu_results.py "$out/torch.json" "$out/engine.json" "$out/server.log" "${variants[@]}" >"$out/RESULTS.md"
cat "$out/RESULTS.md"
