#!/usr/bin/env python3
"""run.py [--quick] [--only NAME] - re-measure the papers' claims with rrnserve train.

Every arm of an experiment gets the same budget (steps, batch, optimizer)
and runs with seeds 1, 2 and 3; the table gives mean and standard
deviation.  Each run's configuration is built here from the base below and
passed to `rrnserve train` as flags, so the command of any single run can
be read off the log this prints.  Results go to stdout as markdown tables
(docs/experiments.md quotes them).  Standard library only.

  (a) skip-RNN versions A-D on remember-the-first-element (T=100, 6-d
      inputs), and the 4-matrix/4-step variant at T=500;
  (b) RRA (static attention) against LSTM on the adding problem, T = 100,
      200, 400: the step at which the validation error first falls below
      0.15 (clearly under the 0.167 baseline) and the final error;
  (c) RRN against LSTM (3 layers) on the Austen novels: training loss after
      the same number of steps, and time;
  (d) RRA, LSTM and skip-RNN on the sentiment data: test accuracy.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "rrnserve")
DATA = os.path.join(ROOT, "..", "shared", "data")
SEEDS = (1, 2, 3)


def train(config, out_dir, name, seed):
    """Run one training; returns (rows of its CSV, seconds)."""
    out = os.path.join(out_dir, "%s_s%d.safetensors" % (name, seed))
    config = dict(config, seed=seed, out=out)
    path = os.path.join(out_dir, "%s_s%d.json" % (name, seed))
    with open(path, "w") as f:
        json.dump(config, f)
    cmd = [BIN, "train", "--config", path]
    print("  $ rrnserve train --config %s  # %s seed %d" % (os.path.basename(path), name, seed), file=sys.stderr)
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    took = time.time() - start
    if res.returncode != 0:
        sys.exit("run.py: %s seed %d failed:\n%s" % (name, seed, res.stderr))
    with open(out[: -len(".safetensors")] + ".csv") as f:
        rows = list(csv.DictReader(f))
    return rows, took, out


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return "%.4g ± %.2g" % (m, sd)


def valid_series(rows, key):
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def last_valid(rows, key="valid_loss"):
    s = valid_series(rows, key)
    return s[-1][1] if s else None


def first_below(rows, threshold, key="valid_loss"):
    for step, v in valid_series(rows, key):
        if v < threshold:
            return step
    return None


def remember(out_dir, quick):
    base = {"model": {"task": "regress", "cell": "rnn_relu", "hidden": 32, "outputs": 6,
                      "input": {"type": "vector", "dim": 6}},
            "data": {"synthetic": "remember", "length": 100, "dim": 6, "train_size": 10000, "valid_size": 1000},
            "optim": {"name": "adam", "lr": 0.001, "clip_norm": 1.0},
            "batch_size": 50, "steps": 400 if quick else 2000, "valid_every": 100, "log_every": 100}
    arms = [("A (K=1, M=1)", {"period": 1, "matrices": 1}, 100), ("B (K=1, M=2)", {"period": 1, "matrices": 2}, 100),
            ("C (K=2, M=1)", {"period": 2, "matrices": 1}, 100), ("D (K=2, M=2)", {"period": 2, "matrices": 2}, 100),
            ("4 matrices, K=4, T=500", {"period": 4, "matrices": 4}, 500)]
    print("\n### (a) remember the first element (validation MSE; predicting 0 scores 0.333)\n")
    print("| version | steps | final validation MSE | runs under 0.05 | seconds per run |")
    print("| --- | --- | --- | --- | --- |")
    for name, skip, length in arms:
        cfg = json.loads(json.dumps(base))
        cfg["model"]["skip"] = skip
        cfg["data"]["length"] = length
        finals, times, learned = [], [], 0
        for seed in SEEDS:
            rows, took, _ = train(cfg, out_dir, "remember_%s_%d" % (skip["period"], skip["matrices"]) + "_T%d" % length,
                                  seed)
            v = last_valid(rows)
            finals.append(v if v is not None and math.isfinite(v) else None)
            learned += v is not None and v < 0.05
            times.append(took)
        print("| %s | %d | %s | %d of %d | %.0f |" % (name, cfg["steps"], stats(finals), learned, len(SEEDS),
                                                     sum(times) / len(times)))


def adding(out_dir, quick):
    base = {"model": {"task": "regress", "cell": "lstm", "hidden": 32, "outputs": 1,
                      "input": {"type": "vector", "dim": 2}},
            "data": {"synthetic": "adding", "train_size": 10000, "valid_size": 1000},
            "optim": {"name": "adam", "lr": 0.003, "clip_norm": 1.0},
            "batch_size": 50, "steps": 500 if quick else 3000, "valid_every": 100, "log_every": 100}
    print("\n### (b) the adding problem (validation MSE; the constant predictor scores 0.167)\n")
    print("| T | model | steps | first step under 0.15 | runs that got there | final validation MSE |")
    print("| --- | --- | --- | --- | --- | --- |")
    for length in (100, 200, 400):
        for name, attention in (("LSTM", None), ("RRA (static, K=8)", {"window": 8, "mode": "static"})):
            cfg = json.loads(json.dumps(base))
            cfg["data"]["length"] = length
            cfg["model"]["attention"] = attention
            firsts, finals = [], []
            for seed in SEEDS:
                rows, _, _ = train(cfg, out_dir, "adding_T%d_%s" % (length, "rra" if attention else "lstm"), seed)
                firsts.append(first_below(rows, 0.15))
                finals.append(last_valid(rows))
            got = sum(f is not None for f in firsts)
            print("| %d | %s | %d | %s | %d of %d | %s |" % (length, name, cfg["steps"], stats(firsts), got,
                                                            len(SEEDS), stats(finals)))


def austen(out_dir, quick):
    novels = ["emma.txt", "mansfieldpark.txt", "northangerabbey.txt", "prideprejudice.txt", "sensesensibility.txt"]
    base = {"model": {"task": "lm", "cell": "lstm", "hidden": 128, "layers": 3, "embed_dim": 32,
                      "tokenizer": {"type": "char"}},
            "data": {"train": [os.path.join(DATA, "austen", n) for n in novels]},
            "optim": {"name": "adam", "lr": 0.002, "clip_norm": 1.0},
            "batch_size": 32, "bptt": 64, "steps": 100 if quick else 300, "log_every": 50}
    print("\n### (c) RRN against LSTM, 3 layers, Austen character model\n")
    print("| model | steps | training loss over the last 50 steps (nats/char) | seconds per run |")
    print("| --- | --- | --- | --- |")
    for name, residual in (("LSTM", False), ("RRN (depth residual)", True)):
        cfg = json.loads(json.dumps(base))
        cfg["model"]["residual_depth"] = residual
        losses, times = [], []
        for seed in SEEDS:
            rows, took, _ = train(cfg, out_dir, "austen_%s" % ("rrn" if residual else "lstm"), seed)
            losses.append(float(rows[-1]["train_loss"]))
            times.append(took)
        print("| %s | %d | %s | %.0f |" % (name, cfg["steps"], stats(losses), sum(times) / len(times)))


def sentiment(out_dir, quick):
    files = [os.path.join(DATA, "sentiment", n) for n in ("amazon.jsonl", "imdb.jsonl")]
    base = {"model": {"task": "classify", "cell": "gru", "hidden": 32, "bidirectional": True, "embed_dim": 128,
                      "pool": "mean", "classes": ["negative", "positive"], "tokenizer": {"type": "word"}},
            "vocab": {"min_count": 2},
            "data": {"train": files, "split": {"mod": 10, "test": 0, "valid": 1}},
            "optim": {"name": "adam", "lr": 0.003, "clip_norm": 1.0, "decay": "cosine"},
            "batch_size": 32, "epochs": 5 if quick else 20, "dropout_embed": 0.5, "keep_best": True,
            "valid_every": 25, "log_every": 25}
    arms = [("LSTM", {"cell": "lstm"}), ("RRA (LSTM, dynamic attention K=4)",
                                          {"cell": "lstm", "attention": {"window": 4, "mode": "dynamic"}}),
            ("skip-RNN (tanh, K=2, M=2)", {"cell": "rnn_tanh", "skip": {"period": 2, "matrices": 2}}),
            ("GRU (the shipped model)", {"cell": "gru"})]
    print("\n### (d) sentiment (accuracy on the test parts, model kept at its best validation)\n")
    print("| model | test accuracy |")
    print("| --- | --- |")
    for name, change in arms:
        cfg = json.loads(json.dumps(base))
        cfg["model"].update(change)
        accs = []
        for seed in SEEDS:
            _, _, model = train(cfg, out_dir, "sentiment_%s" % change["cell"] + ("_rra" if "attention" in change
                                                                                 else ""), seed)
            res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_classify.py"), model] + files
                                 + ["--rrnserve", BIN], capture_output=True, text=True, check=True)
            line = res.stdout.strip().splitlines()[-1]
            accs.append(float(line.rsplit("=", 1)[1]))
        print("| %s | %s |" % (name, stats(accs)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a much smaller budget, to check the script")
    ap.add_argument("--only", choices=("a", "b", "c", "d"))
    a = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="rrn_experiments_")
    parts = {"a": remember, "b": adding, "c": austen, "d": sentiment}
    for key in sorted(parts):
        if a.only in (None, key):
            parts[key](out_dir, a.quick)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
