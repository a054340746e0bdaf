"""gpu_results.py TORCH_JSON ENGINE_JSON [SERVER_LOG [VARIANT_JSON ...]] -
bench/RESULTS.md from `tools/gpu-run.sh bench`: the engine on the GPU
against PyTorch's cuDNN LSTM and GRU and its eager step loops, on the same
weights and tokens (bench_torch.py and bench_engine.c with the device
cuda), with the targets of issue 5 beside each figure.  cuDNN's figures
are compared in FP32 with the engine's FP32 (its recurrence by cuBLAS's
products, and fused) and in TF32 (PyTorch's default for cuDNN) with the
engine's TF32.  Each VARIANT_JSON, engine-NAME.json, is another build's
fused figures (run_bench_gpu.sh), in rows of their own named NAME.
Prints markdown on stdout.
"""
import json
import os
import re
import sys


def main():
    if len(sys.argv) < 3:
        sys.stderr.write("usage: gpu_results.py TORCH_JSON ENGINE_JSON [SERVER_LOG [VARIANT_JSON ...]]\n")
        return 2
    with open(sys.argv[1]) as f:
        t = json.load(f)
    with open(sys.argv[2]) as f:
        e = json.load(f)
    # A variant that crashed before printing leaves no JSON: its rows are
    # lost, not the table.
    variants = []
    for path in sys.argv[4:]:
        try:
            with open(path) as f:
                v = json.load(f)
        except (OSError, ValueError):
            v = {"error": "no figures in %s" % path}
        variants.append((re.sub(r"^engine-|\.json$", "", os.path.basename(path)), v))
    rows = []

    def faster(name, key, target, suffix="", unit="seq/s", eng=e):
        """Throughput: the engine's key + suffix against torch's key,
        higher is better."""
        if key + suffix in eng and key in t:
            r = eng[key + suffix] / t[key]
            rows.append((name, "%.1f %s" % (eng[key + suffix], unit), "%.1f %s" % (t[key], unit), "%.2fx" % r,
                         "%s (>= %gx)" % ("met" if r >= target else "NOT met", target) if target else "-"))

    def sooner(name, key, target, suffix="", eng=e):
        """Latency: torch's key over the engine's key + suffix, higher is
        better."""
        if key + suffix in eng:
            r = t[key] / eng[key + suffix]
            rows.append((name, "%.3f ms" % eng[key + suffix], "%.3f ms" % t[key], "%.2fx" % r,
                         "%s (>= %gx)" % ("met" if r >= target else "NOT met", target) if target else "-"))

    def against_cudnn(tsuffix, suffix, prec, eng=e, wide_only=False):
        faster("classify, LSTM 2x512, E=256, batch 64, T=128, %s (vs cuDNN)" % prec, "classify_seq_per_s" + tsuffix,
               1.0, suffix, eng=eng)
        faster("classify, LSTM, lengths 16-128, each batch its own, %s (vs cuDNN, packed)" % prec,
               "classify_var_seq_per_s" + tsuffix, None, suffix, eng=eng)
        faster("classify, GRU 2x512, E=256, batch 64, T=128, %s (vs cuDNN)" % prec,
               "gru_classify_seq_per_s" + tsuffix, 1.0, suffix, eng=eng)
        for b in (64,) if wide_only else (1, 8, 64):
            sooner("generation step, LSTM 2x512, batch %d, %s (vs cuDNN)" % (b, prec),
                   "step_ms_b%d%s" % (b, tsuffix), 1.0 if b < 64 else None, suffix, eng=eng)

    def against_eager(suffix, prec, eng=e, wide_only=False):
        faster("RRA LM (dynamic, window 8), batch 64, %s (vs eager loop)" % prec, "rra_seq_per_s", 20.0, suffix,
               eng=eng)
        if not wide_only:
            faster("RRA LM, batch 1, %s (vs eager loop)" % prec, "rra1_seq_per_s", 20.0, suffix, eng=eng)
        faster("skip LM (period 2, 2 matrices), batch 64, %s (vs eager loop)" % prec, "skip_seq_per_s", 20.0,
               suffix, eng=eng)
        if not wide_only:
            faster("skip LM, batch 1, %s (vs eager loop)" % prec, "skip1_seq_per_s", 20.0, suffix, eng=eng)

    # The engine's FP32 with the recurrence by cuBLAS's products, then
    # fused, both against cuDNN in FP32; then TF32 against cuDNN in TF32.
    for tsuffix, suffix, prec in (("", "", "FP32"), ("", "_fused", "FP32, fused"), ("_tf32", "", "TF32")):
        against_cudnn(tsuffix, suffix, prec)
    for suffix, prec in (("", "FP32"), ("_fused", "FP32, fused")):
        against_eager(suffix, prec)
    # A variant's tiles (rowsN) differ from this build's only past 16 rows;
    # the others differ at every batch.
    for name, v in variants:
        wide_only = name.startswith("rows")
        against_cudnn("", "_fused", "FP32, fused, " + name, eng=v, wide_only=wide_only)
        against_eager("_fused", "FP32, fused, " + name, eng=v, wide_only=wide_only)
    faster("training, LSTM LM 2x512, 32 windows of 127 tokens, clipping and Adam, FP32 (vs cuDNN)",
           "train_tok_per_s", None, unit="tok/s")

    print("# GPU benchmarks\n")
    print("Device: %s; PyTorch %s, cuDNN %s. Made by `tools/gpu-run.sh bench` "
          "(bench_torch.py and bench_engine.c on the same weights and tokens). "
          "PyTorch's defaults here: cuDNN may use TF32 %s, matmul may use TF32 %s.\n"
          % (t.get("device", "?"), t.get("torch_version", "?"), t.get("cudnn", "?"),
             t.get("cudnn_allow_tf32_default", "?"), t.get("matmul_allow_tf32_default", "?")))
    print("| workload | rrnserve | PyTorch | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| %s |" % " | ".join(r))
    errors = [(k.replace("_max_error", ""), e[k]) for k in sorted(e) if "_max_error" in k and "_tf32" not in k]
    if errors:
        print("\nEvery FP32 workload's outputs were checked against PyTorch's for the same batch (the benchmark "
              "fails past 1e-3); the largest differences: %s." % ", ".join("%s %.2g" % kv for kv in errors))
    if "train_loss_error" in e:
        print("\nThe first training step's mean loss differed from PyTorch's by %.2g." % e["train_loss_error"])
    if "error" in e:
        print("\n**The benchmark stopped early**, its figures above are those measured before: %s" % e["error"])
    if "classify_var_graphs" in e:
        print("\nThe varied-lengths batches ran from %d recorded graph(s) in FP32 and %d in TF32 (one or two is what "
              "padding is for: the longest of 64 lengths up to 128 nearly always pads to 128; packed, none is recorded)." % (e["classify_var_graphs"], e.get("classify_var_graphs_tf32", -1)))
    for name, v in variants:
        if "error" in v:
            print("\n**The %s variant stopped early**: %s" % (name, v["error"]))
    if len(sys.argv) >= 4:
        with open(sys.argv[3]) as f:
            log = f.read()
        for row, prompts in (("/generate", "eight prompts shared, from the prompt cache"),
                             ("/generate, own prompts", "a prompt of its own each")):
            m = re.search(r"\| %s \| 64 \| on \(64\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|"
                          % re.escape(row), log)
            if m:
                print("\nEnd to end, `/generate` (32 tokens) at 64 concurrent streams on the GPU, %s: %s requests/s, "
                      "%s tokens/s, p50 %s ms, p99 %s ms (`BENCH_DEVICE=cuda make bench-server`)."
                      % ((prompts,) + m.groups()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
