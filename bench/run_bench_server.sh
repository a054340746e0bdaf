#!/usr/bin/env bash
# run_bench_server.sh LOADGEN - `make bench-server`: throughput and latency of
# the HTTP server under load, with dynamic/continuous batching on
# (--max-batch 64) and off (--max-batch 1).
#
# It serves two models from a temporary folder: models/sentiment.safetensors
# and models/austen.safetensors when they exist, else random (seeded) ones of
# the same kind made with tools/export_torch.py: a classifier (byte
# tokenizer, LSTM, 1 layer, H=256, E=64, 2 classes, pool last) and a
# language model (byte tokenizer, LSTM, 2 layers, H=256, E=64).  LOADGEN
# (bench/loadgen.c) drives /classify (a different sentence of 60-120
# characters per request) and /generate (one of eight short prompts,
# max_tokens 32, temperature 1, a distinct seed per request) with 1, 16, 64
# and 256 keep-alive clients on 127.0.0.1, BENCH_SECONDS (default 5)
# seconds each, on BENCH_DEVICE (default cpu; cuda on a GPU machine); and,
# batching, /generate at 64 clients with a prompt of its own for every
# request, none of which the prompt cache can supply.
#
# Prints a markdown table, the /classify batching speed-up at 64 clients,
# and the HTTP and JSON overhead at batch 64: the server's time per
# /classify request against the engine's own time per sequence, read from
# GET /metrics (rrnserve_engine_seconds, rrnserve_batch_size) around that
# run.
set -euo pipefail
cd "$(dirname "$0")/.."
loadgen=${1:?usage: run_bench_server.sh LOADGEN}
py=${PYTHON:-/usr/bin/python3}
secs=${BENCH_SECONDS:-5}
device=${BENCH_DEVICE:-cpu}
clients_list=${BENCH_CLIENTS:-"1 16 64 256"}
dir=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$dir/models"
if ! "$py" -c 'import numpy' 2>/dev/null; then
    echo "run_bench_server.sh: $py needs numpy for the benchmark models (apt-get install python3-numpy)" >&2
    exit 1
fi

# Models, request bodies (one per line) and the texts for the engine-only run.
"$py" - "$dir" <<'PY'
import json, os, random, shutil, sys
sys.path.insert(0, "tools")
import numpy as np
from export_torch import save_rrnserve

out = sys.argv[1]
rng = np.random.default_rng(1234)

def lstm(task, layers, H, E, classes=None):
    V = 256
    k = 1 / np.sqrt(H)
    u = lambda *shape: rng.uniform(-k, k, size=shape).astype(np.float32)
    t = {"embedding.weight": rng.standard_normal((V, E)).astype(np.float32)}
    for l in range(layers):
        t[f"rnn.weight_ih_l{l}"] = u(4 * H, E if l == 0 else H)
        t[f"rnn.weight_hh_l{l}"] = u(4 * H, H)
        t[f"rnn.bias_ih_l{l}"] = u(4 * H)
        t[f"rnn.bias_hh_l{l}"] = u(4 * H)
    C = len(classes) if classes else V
    t["head.weight"] = u(C, H)
    t["head.bias"] = u(C)
    cfg = {"task": task, "cell": "lstm", "hidden": H, "layers": layers, "bidirectional": False,
           "embed_dim": E, "tokenizer": {"type": "byte"}}
    if classes:
        cfg.update(pool="last", classes=classes)
    return t, cfg

# BENCH_CLASSIFY_SHAPE="layers hidden embed" replaces the classifier with a
# random one of that shape (the engine benchmark's is "2 512 256").
shape = os.environ.get("BENCH_CLASSIFY_SHAPE")
cls_args = ("classify", *map(int, shape.split()), ["negative", "positive"]) if shape else \
           ("classify", 1, 256, 64, ["negative", "positive"])
for name, args in (("sentiment", cls_args), ("austen", ("lm", 2, 256, 64))):
    shipped = os.path.join("models", name + ".safetensors")
    dst = os.path.join(out, "models", name + ".safetensors")
    if os.path.exists(shipped) and not (shape and name == "sentiment"):
        shutil.copyfile(shipped, dst)
        print(f"model {name}: {shipped}", file=sys.stderr)
    else:
        t, cfg = lstm(*args)
        save_rrnserve(dst, t, cfg)
        print(f"model {name}: random weights ({cfg['cell']}, {cfg['layers']} layer(s), "
              f"H={cfg['hidden']}, E={cfg['embed_dim']}, byte tokenizer)", file=sys.stderr)

# Review-like sentences of 60-120 characters, every one different.
r = random.Random(7)
subj = ["The film", "This movie", "The plot", "The acting", "The soundtrack", "The ending", "The cast",
        "This book", "The hotel", "Our waiter", "The new phone", "The battery", "The camera", "The sequel"]
verb = ["was", "felt", "seemed", "turned out to be", "is honestly", "was frankly", "remains"]
adj = ["wonderful", "dull", "surprisingly good", "a total mess", "charming", "painfully slow",
       "beautifully shot", "forgettable", "brilliant", "overpriced", "far too long", "delightful"]
tail = ["and I would watch it again.", "but the second half dragged on.", "and the kids loved every minute.",
        "though the dialogue felt forced.", "so I asked for a refund.", "and it exceeded my expectations.",
        "but I expected more from the director.", "and I recommended it to all my friends.",
        "although the price was a bit steep.", "and I fell asleep halfway through."]
texts, seen = [], set()
while len(texts) < 2000:
    s = f"{r.choice(subj)} {r.choice(verb)} {r.choice(adj)}, {r.choice(tail)}"
    if r.random() < 0.5:
        s += f" {r.choice(['Five stars.', 'Two stars.', 'Not again.', 'Worth it.', 'Meh.'])}"
    if 60 <= len(s) <= 120 and s not in seen:
        seen.add(s)
        texts.append(s)
with open(os.path.join(out, "classify.jsonl"), "w") as f:
    for s in texts:
        f.write(json.dumps({"model": "sentiment", "text": s}) + "\n")
prompts = ["It is a truth ", "She was ", "Mr. Darcy ", "The weather ", "Emma could not ",
           "In the morning ", "My dear ", "They walked "]
# The same prompts, each request's made its own by its sequence number in
# front (so that no part of it comes from the prompt cache).
for name, head in (("generate", ""), ("generate_unique", "{{seq}} ")):
    with open(os.path.join(out, name + ".jsonl"), "w") as f:
        for p in prompts:
            body = json.dumps({"model": "austen", "prompt": head + p, "max_tokens": 32, "temperature": 1, "seed": 0})
            f.write(body.replace('"seed": 0', '"seed": {{seq}}') + "\n")
# The engine alone: 64 identical texts per batch, as at 64 clients.
with open(os.path.join(out, "engine.jsonl"), "w") as f:
    for _ in range(64 * 40):
        f.write(json.dumps({"text": texts[0]}) + "\n")
PY

# Start the server; sets server_pid and port.
start_server() {
    : >"$dir/server.log"
    ./rrnserve serve --models "$dir/models" --port 0 --device "$device" "$@" 2>"$dir/server.log" &
    server_pid=$!
    port=
    for _ in $(seq 1 300); do
        port=$(sed -n 's|.*listening on http://[^ ]*:\([0-9][0-9]*\).*|\1|p' "$dir/server.log" | head -n 1)
        [ -n "$port" ] && break
        if ! kill -0 "$server_pid" 2>/dev/null; then
            cat "$dir/server.log" >&2
            echo "run_bench_server.sh: the server did not start" >&2
            exit 1
        fi
        sleep 0.1
    done
    if [ -z "$port" ]; then
        echo "run_bench_server.sh: the server did not say where it listens" >&2
        exit 1
    fi
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" || true
    server_pid=
}

metrics() {
    "$py" -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
        "http://127.0.0.1:$port/metrics" >"$1"
}

: >"$dir/results.jsonl"
for mode in batching nobatch; do
    if [ "$mode" = batching ]; then
        start_server --max-batch 64
    else
        start_server --max-batch 1
    fi
    echo "server ($mode) on port $port" >&2
    # Warm up: touch both models once.
    "$loadgen" --url "http://127.0.0.1:$port/classify" --body "$dir/classify.jsonl" --clients 4 --seconds 0.5 >/dev/null
    "$loadgen" --url "http://127.0.0.1:$port/generate" --body "$dir/generate.jsonl" --clients 4 --seconds 0.5 >/dev/null
    for ep in classify generate; do
        for c in $clients_list; do
            overhead=0
            [ "$mode" = batching ] && [ "$ep" = classify ] && [ "$c" = 64 ] && overhead=1
            [ $overhead = 1 ] && metrics "$dir/metrics_before.txt"
            line=$("$loadgen" --url "http://127.0.0.1:$port/$ep" --body "$dir/$ep.jsonl" --clients "$c" --seconds "$secs")
            [ $overhead = 1 ] && metrics "$dir/metrics_after.txt"
            echo "  /$ep clients=$c: $line" >&2
            printf '{"endpoint":"/%s","mode":"%s","run":%s}\n' "$ep" "$mode" "$line" >>"$dir/results.jsonl"
        done
    done
    if [ "$mode" = batching ]; then
        line=$("$loadgen" --url "http://127.0.0.1:$port/generate" --body "$dir/generate_unique.jsonl" --clients 64 \
            --seconds "$secs")
        echo "  /generate clients=64, a prompt of its own each: $line" >&2
        printf '{"endpoint":"/generate, own prompts","mode":"%s","run":%s}\n' "$mode" "$line" >>"$dir/results.jsonl"
    fi
    stop_server
done

# The engine alone on batches of 64 identical texts (tokenizing and
# printing included, no HTTP), for comparison.
t0=$(date +%s.%N)
./rrnserve run "$dir/models/sentiment.safetensors" --jsonl "$dir/engine.jsonl" --batch 64 --device "$device" >/dev/null
t1=$(date +%s.%N)

"$py" - "$dir" "$secs" "$t0" "$t1" <<'PY'
import json, re, sys
d, secs, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(l) for l in open(f"{d}/results.jsonl")]
print()
print("| endpoint | clients | batching | req/s | tokens/s | p50 ms | p99 ms | errors |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    x = r["run"]
    err = x["errors"]
    errs = str(err["total"]) + ("" if err["total"] == 0 else " (" + ", ".join(
        f"{k}: {v}" for k, v in err.items() if k != "total") + ")")
    tps = f"{x['tokens_per_s']:.0f}" if r["endpoint"].startswith("/generate") else "-"
    print(f"| {r['endpoint']} | {x['clients']} | {'on (64)' if r['mode'] == 'batching' else 'off (1)'} | "
          f"{x['throughput_rps']:.1f} | {tps} | {x['latency_ms']['p50']:.2f} | {x['latency_ms']['p99']:.2f} | {errs} |")

def pick(ep, mode, c):
    for r in rows:
        if r["endpoint"] == ep and r["mode"] == mode and r["run"]["clients"] == c:
            return r["run"]
    return None

on, off = pick("/classify", "batching", 64), pick("/classify", "nobatch", 64)
print()
if on and off and off["throughput_rps"] > 0:
    print(f"/classify throughput at 64 clients, batching vs --max-batch 1: "
          f"{on['throughput_rps']:.1f} / {off['throughput_rps']:.1f} req/s = "
          f"{on['throughput_rps'] / off['throughput_rps']:.2f}x")
for ep in ("/classify", "/generate"):
    a, b = pick(ep, "batching", 256), pick(ep, "nobatch", 256)
    if a and b and b["throughput_rps"] > 0:
        print(f"{ep} throughput at 256 clients, batching vs --max-batch 1: {a['throughput_rps'] / b['throughput_rps']:.2f}x")

def scrape(path):
    m = {}
    for line in open(path):
        if line.startswith("#"):
            continue
        k, _, v = line.rpartition(" ")
        if k:
            m[k] = float(v)
    return m

try:
    b, a = scrape(f"{d}/metrics_before.txt"), scrape(f"{d}/metrics_after.txt")
except OSError:
    sys.exit(0)
# A series, or a metric summed over its series (every model's).
total = lambda m, k: sum(v for s, v in m.items() if s == k or s.startswith(k + "{"))
delta = lambda k: total(a, k) - total(b, k)
batches = delta("rrnserve_engine_seconds_count")
eng = delta("rrnserve_engine_seconds_sum")
seqs = delta("rrnserve_batch_size_sum")
reqs = delta('rrnserve_request_duration_seconds_count{endpoint="/classify"}')
lat = delta('rrnserve_request_duration_seconds_sum{endpoint="/classify"}')
if not (on and batches > 0 and seqs > 0 and reqs > 0):
    sys.exit(0)
per_req = 1e6 / on["throughput_rps"]          # wall time per answered request
eng_seq = 1e6 * eng / seqs                    # engine time per sequence
eng_batch = 1e3 * eng / batches
n_engine = 64 * 40
cli_seq = 1e6 * (t1 - t0) / n_engine
print()
print(f"HTTP and JSON overhead at batch 64 (/classify, 64 clients, --max-batch 64):")
print(f"  mean engine batch: {seqs / batches:.1f} sequences, {eng_batch:.2f} ms in the engine "
      f"({eng_seq:.0f} us per sequence); engine busy {100 * eng / secs:.0f}% of the run")
print(f"  server: {per_req:.0f} us of wall time per request (1 / throughput); "
      f"{per_req - eng_seq:.0f} us ({100 * (per_req - eng_seq) / per_req:.0f}%) of it outside the engine "
      f"(HTTP, JSON, tokenizing, queueing, the load generator on the same 2 cores)")
print(f"  latency: mean {1e3 * lat / reqs:.2f} ms per request in the server against {eng_batch:.2f} ms "
      f"for its engine batch")
print(f"  engine alone (rrnserve run --jsonl, {n_engine} texts in batches of 64, process start and "
      f"model load included): {cli_seq:.0f} us per text, {1e6 / cli_seq:.0f} texts/s")
PY
