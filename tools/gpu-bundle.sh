#!/usr/bin/env bash
# gpu-bundle.sh - package what a session with a GPU needs to run rrnserve's
# CUDA tests and benchmarks there, in one `device` call.
#
# The GPU machine has the CUDA toolkit, cuBLAS and PyTorch, but none of the
# Debian libraries rrnserve links (libmicrohttpd, cJSON, OpenBLAS, cmocka,
# ...), and cannot fetch them.  So everything is built here (nvcc, for
# sm_80 and sm_90) and this writes .gpu/bundle.tar.xz: build/cuda's
# rrnserve, CUDA library, tests and benchmarks, and every non-CUDA shared
# library they load (the CUDA ones are the machine's own).  Then:
#
#   tools/gpu-bundle.sh
#   device run, carry [".gpu"], command "tools/gpu-run.sh"
#
# tools/gpu-run.sh, run there, says what it does and what it writes.
# The bundle holds three other builds of bench_engine and its CUDA library,
# which gpu-run.sh bench times beside it: rows32 and rows16, the fused
# recurrence with tiles of at most 32 and 16 rows (FUSED_ROWS_MAX in
# engine/cuda_fused.cu; this build's is 64), and nooverlap, its steps
# launched without programmatic dependent launch (FUSED_OVERLAP), each in
# build/cuda/bench/variants/NAME laid out as a build folder (bench/bench_engine
# beside the library it loads).  RRN_BENCH_VARIANTS="NAME=BUILD ..." adds
# other build folders (a branch's) for gpu-run.sh compare to time beside
# this one.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
    echo "gpu-bundle.sh: no nvcc here: the bundle needs the CUDA build" >&2
    exit 1
}
tests=$(ls tests/test_*.c | sed 's|^tests/\(.*\)\.c$|build/cuda/tests/\1|')
make -j"$(nproc)" CUDA=1 rrnserve build/cuda/bench/bench_engine build/cuda/bench/loadgen build/cuda/tools/libcupti_trace.so \
    $tests
variants=${RRN_BENCH_VARIANTS:-}
for spec in rows32:-DFUSED_ROWS_MAX=32 rows16:-DFUSED_ROWS_MAX=16 nooverlap:-DFUSED_OVERLAP=0; do
    name=${spec%%:*}
    make -j"$(nproc)" CUDA=1 BUILD=build/cuda-$name CUDA_DEFS="${spec#*:}" build/cuda-$name/bench/bench_engine
    variants="$variants $name=build/cuda-$name"
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/build/cuda/tests" "$stage/build/cuda/bench" "$stage/build/cuda/tools" "$stage/lib"
cp build/cuda/rrnserve build/cuda/librrnserve-cuda.so "$stage/build/cuda/"
cp build/cuda/tools/libcupti_trace.so "$stage/build/cuda/tools/"
cp $tests "$stage/build/cuda/tests/"
cp build/cuda/bench/bench_engine build/cuda/bench/loadgen "$stage/build/cuda/bench/"
for variant in $variants; do
    dir="$stage/build/cuda/bench/variants/${variant%%=*}"
    mkdir -p "$dir/bench"
    cp "${variant#*=}/bench/bench_engine" "$dir/bench/"
    cp "${variant#*=}/librrnserve-cuda.so" "$dir/"
done
# The training data and the held-out novel the Austen model is scored on
# (../shared does not travel to the GPU machine), for gpu-run.sh's train
# and precision runs.
if [ -d ../shared/data ]; then
    cp -r ../shared/data "$stage/data"
    chmod -R u+w "$stage/data" # ../shared is read-only; the trap removes this
fi
# Every library the binaries load, but the C library's and CUDA's own.
shopt -s nullglob
for bin in "$stage"/build/cuda/{rrnserve,librrnserve-cuda.so} "$stage"/build/cuda/tests/* \
    "$stage"/build/cuda/bench/{bench_engine,loadgen} "$stage"/build/cuda/bench/variants/*/{bench/bench_engine,*.so}; do
    ldd "$bin" | awk '$3 ~ /^\// { print $3 }'
done | sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so|/cuda' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
mkdir -p .gpu
tar -C "$stage" -cf - . | xz -T0 -6 >.gpu/bundle.tar.xz
echo "gpu-bundle.sh: .gpu/bundle.tar.xz, $(du -h .gpu/bundle.tar.xz | cut -f1)"
