#!/usr/bin/env python3
"""eval_classify.py MODEL FILE.jsonl [FILE.jsonl ...] [--part test|valid|train]
       [--mod 10 --test 0 --valid 1] [--rrnserve ./rrnserve]

Accuracy of a classifier on one part of labelled JSONL files, per file and
overall, with the split rule of ../shared/data/README.md (line i, 0-based,
blank lines not counted, is test when i % mod == test, validation when
i % mod == valid, training otherwise).  The texts go through
`rrnserve run --jsonl -`, so this measures exactly what the server answers.
Standard library only.
"""
import argparse
import json
import subprocess
import sys


def part_of(i, a):
    if i % a.mod == a.test:
        return "test"
    if i % a.mod == a.valid:
        return "valid"
    return "train"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--part", default="test", choices=("test", "valid", "train"))
    ap.add_argument("--mod", type=int, default=10)
    ap.add_argument("--test", type=int, default=0)
    ap.add_argument("--valid", type=int, default=1)
    ap.add_argument("--rrnserve", default="./rrnserve")
    a = ap.parse_args()
    right = total = 0
    for path in a.files:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for i, r in enumerate(rows) if part_of(i, a) == a.part]
        lines = "".join(json.dumps({"text": r["text"]}) + "\n" for r in rows)
        out = subprocess.run([a.rrnserve, "run", a.model, "--jsonl", "-"], input=lines, capture_output=True,
                             text=True, check=False)
        results = [json.loads(line) for line in out.stdout.splitlines()]
        if len(results) != len(rows):
            sys.exit("eval_classify: %s: %d answers for %d texts: %s" % (path, len(results), len(rows), out.stderr))
        ok = sum(1 for r, res in zip(rows, results) if res.get("label") == r["label"])
        print("%s %s: %d/%d = %.4f" % (path, a.part, ok, len(rows), ok / len(rows)))
        right += ok
        total += len(rows)
    print("overall %s accuracy: %d/%d = %.4f" % (a.part, right, total, right / total))


if __name__ == "__main__":
    main()
