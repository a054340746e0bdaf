#!/usr/bin/env bash
# precision.sh RRNSERVE [OUTDIR] [PRECISION ...] - what the matrix products'
# precision costs (issue 5): the bits per character of models/austen on
# Persuasion and the accuracy of models/sentiment on its 200 test sentences,
# each on --device cuda at every precision named (default fp32 tf32 bf16),
# with the largest change of any sentiment probability against the first.
#
# RRNSERVE is a CUDA build: ./rrnserve on a GPU (tools/gpu-run.sh precision),
# or the emulator's (`make emu-rrnserve`, build/emu-nosan/rrnserve), which
# rounds the products' operands as the GPU's TF32 and BF16 modes do and sums
# in FP32, so that its figures are the GPU's arithmetic on a machine without
# one; there Austen takes about 40 minutes a precision on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: precision.sh RRNSERVE [OUTDIR] [PRECISION ...]}
out=${2:-$(mktemp -d)}
shift
[ $# -eq 0 ] || shift
precisions=("$@")
[ ${#precisions[@]} -gt 0 ] || precisions=(fp32 tf32 bf16)
mkdir -p "$out"
persuasion=../shared/data/austen/persuasion.txt
sentences=tests/fixtures/data/sentiment.test.jsonl
for p in "${precisions[@]}"; do
    echo "== $p"
    if [ -f "$persuasion" ]; then
        "$bin" run models/austen.safetensors --file "$persuasion" --device cuda --precision "$p"
    else
        echo "no $persuasion: no bits per character"
    fi
    "$bin" run models/sentiment.safetensors --jsonl "$sentences" --device cuda --precision "$p" \
        >"$out/sentiment-$p.jsonl"
done
python3 - "$sentences" "${precisions[@]/#/$out/sentiment-}" <<'PY'
import json, sys
want = [json.loads(l)["label"] for l in open(sys.argv[1]) if l.strip()]
runs = [(path, [json.loads(l) for l in open(path + ".jsonl") if l.strip()]) for path in sys.argv[2:]]
first = runs[0][1]
if not first:
    sys.exit("no sentiment results at %s" % runs[0][0])
for path, got in runs:
    if not got or len(got) != len(first):
        print("%s: no sentiment results" % path)
        continue
    right = sum(a == b.get("label") for a, b in zip(want, got))
    change = max(abs(x["probabilities"][k] - y["probabilities"][k])
                 for x, y in zip(got, first) for k in x["probabilities"])
    print("%s: sentiment accuracy %d/%d, largest change of a probability %.2g"
          % (path.rsplit("sentiment-", 1)[1], right, len(want), change))
PY
