#!/usr/bin/env bash
# soak.sh [LOADGEN] - a long mixed load against one `rrnserve serve` on
# 127.0.0.1, watching the server's memory and file descriptors.  Its
# figures are in docs/reliability.md; make test-tsan runs it for 30 s on
# the ThreadSanitizer build (RRN_BIN names the binary; default ./rrnserve).
#
# Build first: make rrnserve build/cpu/bench/loadgen (or build/cuda/...).
# 72 keep-alive clients in all, six bench/loadgen processes at once:
# /classify 16 clients, /generate 12 (some with n 4 and log-probabilities,
# some with 6,240-character prompts, run over several turns, some with a
# 315-character beginning in common, found in the prompt cache at its
# 256-token boundary, on models/austen when it is there), /generate
# streamed 12, /v1/completions 8 (whole, streamed, and several prompts
# echoed with their log-probabilities), /score 12 (some with each
# position's alternatives), /attention 12, on fixture models (and
# models/sentiment.safetensors when it exists).  --max-queue 16 makes the
# server refuse some work with 503 under this load, so the refusal path
# is soaked too; every other error status is a failure.  Every 10 s it
# samples the server's VmRSS, open fds and threads (/proc/PID) into
# SOAK_OUT/samples.csv (SOAK_OUT defaults to a temporary folder, printed).
# Meanwhile it churns what the load does not: about every 2 s one served
# model's file is replaced by a copy of itself and the server sent
# SIGHUP, so the reload tears down its batcher under load; between
# reloads /metrics and /models are scraped and a client starts a stream
# of 100,000 tokens and leaves after its first events.  At the end it
# stops the server (SIGTERM) and prints the loadgen results, the errors
# by kind, and the samples.  Exits non-zero on an error other than 503
# (and a 499 for each client that left, no more), a server that died or
# did not stop cleanly (a sanitizer's report makes its exit status
# non-zero), or fds that grew.
set -euo pipefail
cd "$(dirname "$0")/.."
loadgen=${1:-$(ls build/*/bench/loadgen 2>/dev/null | head -1)}
secs=${SOAK_SECONDS:-600}
out=${SOAK_OUT:-$(mktemp -d /tmp/rrn_soak_XXXXXX)}
[ -x "$loadgen" ] || { echo "soak.sh: no loadgen (make build/cpu/bench/loadgen)" >&2; exit 2; }
bin=${RRN_BIN:-./rrnserve}
[ -x "$bin" ] || { echo "soak.sh: no $bin (make)" >&2; exit 2; }
mkdir -p "$out/models"
# A copy, so that rebuilding the binary meanwhile does not touch the run.
cp "$bin" "$out/rrnserve"
for m in combo_lstm_lm rra_dynamic_w3_l2_bi plain_lstm_l2_bi_last tok_word_lm; do
    cp "tests/fixtures/$m.safetensors" "$out/models/"
done
cls_model=plain_lstm_l2_bi_last
if [ -f models/sentiment.safetensors ]; then
    cp models/sentiment.safetensors "$out/models/"
    cls_model=sentiment
fi
# Prompts that share a long beginning and end in their request's number
# need a model whose tokens include digits: austen's.
shared_model=combo_lstm_lm
if [ -f models/austen.safetensors ]; then
    cp models/austen.safetensors "$out/models/"
    shared_model=austen
fi

server_pid=
churn_pid=
cleanup() {
    [ -n "$churn_pid" ] && kill "$churn_pid" 2>/dev/null
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# Request bodies, one per line; {{seq}} is the request's number.
cat >"$out/classify.txt" <<EOF
{"model": "$cls_model", "text": "a quiet evening with a good book, nothing more to ask {{seq}}"}
{"model": "rra_dynamic_w3_l2_bi", "texts": ["good day!", "a nice day", "what a terrible, dull afternoon"]}
{"model": "plain_lstm_l2_bi_last", "text": "café — très bien 😀 {{seq}}"}
EOF
cat >"$out/generate.txt" <<'EOF'
{"model": "combo_lstm_lm", "prompt": "the ", "max_tokens": 32, "seed": {{seq}}, "temperature": 0.8, "top_k": 20}
{"model": "tok_word_lm", "prompt": "hello world", "max_tokens": 16, "seed": {{seq}}, "top_p": 0.9, "stop": "x"}
{"model": "combo_lstm_lm", "prompt": "four of one prompt, {{seq}}, sharing it", "max_tokens": 8, "seed": {{seq}}, "n": 4, "logprobs": true, "top_logprobs": 3}
EOF
long=$(printf 'a prompt long enough to run over several turns. %.0s' $(seq 130))
echo "{\"model\": \"combo_lstm_lm\", \"prompt\": \"${long}{{seq}}\", \"max_tokens\": 4, \"seed\": {{seq}}}" \
    >>"$out/generate.txt"
shared=$(printf 'one long beginning that many prompts share, %.0s' 1 2 3 4 5 6 7)
echo "{\"model\": \"$shared_model\", \"prompt\": \"${shared}then each its own: {{seq}}\", \"max_tokens\": 8, \"seed\": {{seq}}}" \
    >>"$out/generate.txt"
cat >"$out/stream.txt" <<'EOF'
{"model": "combo_lstm_lm", "prompt": "good day", "max_tokens": 48, "seed": {{seq}}, "stream": true}
{"model": "tok_word_lm", "prompt": "it is a good", "max_tokens": 24, "seed": {{seq}}, "stream": true, "logprobs": true, "top_logprobs": 2}
EOF
cat >"$out/completions.txt" <<'EOF'
{"model": "combo_lstm_lm", "prompt": ["the "], "max_tokens": 24, "seed": {{seq}}, "n": 2, "logprobs": 2}
{"model": "tok_word_lm", "prompt": "hello world", "max_tokens": 12, "seed": {{seq}}, "stream": true, "stream_options": {"include_usage": true}}
{"model": "combo_lstm_lm", "prompt": ["good day {{seq}}", "the end", "a nice day"], "echo": true, "max_tokens": 0, "logprobs": 1}
{"model": "tok_word_lm", "prompt": ["it is a good {{seq}}", "hello"], "echo": true, "max_tokens": 3, "n": 2, "seed": {{seq}}, "logprobs": 2}
EOF
cat >"$out/score.txt" <<'EOF'
{"model": "tok_word_lm", "text": "the world is a good place {{seq}}"}
{"model": "combo_lstm_lm", "texts": ["good day", "a nice day", "{{seq}} and more"], "logprobs": true}
{"model": "combo_lstm_lm", "text": "good day and {{seq}} more", "logprobs": true, "top_logprobs": 5}
EOF
cat >"$out/attention.txt" <<'EOF'
{"model": "rra_dynamic_w3_l2_bi", "text": "a nice day for a walk {{seq}}"}
EOF

# The server logs a line per request, millions in a long run: a filter
# keeps their counts by method, path and status (written when the server
# exits) and every other line.
mkfifo "$out/log.fifo"
unbuffered=() # mawk, Debian's awk, reads a pipe in blocks unless told not to
awk -W version 2>&1 | grep -q mawk && unbuffered=(-W interactive)
awk "${unbuffered[@]}" -v counts="$out/requests.txt" '
    $2 ~ /^(GET|POST)$/ && NF >= 4 { n[$2 " " $3 " " $4]++; next }
    { print; fflush() }
    END { for (k in n) print n[k], k > counts }' <"$out/log.fifo" >"$out/server.log" &
filter_pid=$!
"$out/rrnserve" serve --models "$out/models" --port 0 --host 127.0.0.1 --device cpu --max-queue 16 --max-tokens-limit 100000 \
    2>"$out/log.fifo" &
server_pid=$!
port=
for _ in $(seq 600); do
    port=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out/server.log" | head -1)
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$port" ] || { echo "soak.sh: the server did not start:" >&2; cat "$out/server.log" >&2; exit 1; }
echo "soak: server pid $server_pid on port $port, $secs s, output in $out"

sample() {
    local t=$1 rss fds threads
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status")
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$server_pid/status")
    fds=$(ls "/proc/$server_pid/fd" | wc -l)
    echo "$t,$rss,$fds,$threads" >>"$out/samples.csv"
}
echo "seconds,rss_kb,fds,threads" >"$out/samples.csv"
sample 0

run() { # NAME PATH CLIENTS
    "$loadgen" --url "http://127.0.0.1:$port/$2" --body "$out/$1.txt" --clients "$3" --seconds "$secs" \
        --timeout-ms 120000 >"$out/$1.json" 2>"$out/$1.err" &
}
run classify classify 16
pids=$!
run generate generate 12
pids="$pids $!"
run stream generate 12
pids="$pids $!"
run completions v1/completions 8
pids="$pids $!"
run score score 12
pids="$pids $!"
run attention attention 12
pids="$pids $!"

# The end of the server's log, or from a sanitizer's first report on.
show_log() {
    if grep -q 'Sanitizer' "$out/server.log"; then sed -n '/Sanitizer/,$p' "$out/server.log" | head -300 >&2
    else tail -20 "$out/server.log" >&2; fi
}
# A GET on a connection of its own (bash's /dev/tcp: curl is not among
# the packages); prints what comes back within 10 s.
http_get() { # PATH
    local fd
    exec {fd}<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$1" >&$fd
    timeout 10 cat <&$fd
    exec {fd}>&-
}
# A client that asks for a long stream and leaves after its first events;
# fails when the stream did not start (a 503 when the queue is full).
leave_stream() {
    local fd got body='{"model": "combo_lstm_lm", "prompt": "the ", "max_tokens": 100000, "stream": true}'
    exec {fd}<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
        "${#body}" "$body" >&$fd
    got=$(timeout 10 head -c 1000 <&$fd)
    exec {fd}>&-
    [[ $got == 'HTTP/1.1 200'* ]]
}
# It stops at a file's appearance, between two clients, not at a signal:
# killed between a stream's start and its count, it counted one 499 short.
churn() {
    local reloads=0 scrapes=0 left=0 i
    while [ ! -e "$out/churn.stop" ]; do
        for i in 1 2 3; do
            [ -e "$out/churn.stop" ] && break 2
            case $(http_get /metrics) in *'rrnserve_requests_total{'*) scrapes=$((scrapes + 1)) ;; esac
            http_get /models >/dev/null || true
            if leave_stream; then left=$((left + 1)); fi
            sleep 0.5
        done
        # A new inode under the same name: the reload replaces the model.
        cp "$out/models/rra_dynamic_w3_l2_bi.safetensors" "$out/models/.replace"
        mv "$out/models/.replace" "$out/models/rra_dynamic_w3_l2_bi.safetensors"
        kill -HUP "$server_pid" && reloads=$((reloads + 1))
    done
    echo "$reloads $scrapes $left" >"$out/churn.txt"
}
churn &
churn_pid=$!

start=$(date +%s)
while :; do
    sleep 10
    now=$(( $(date +%s) - start ))
    kill -0 "$server_pid" 2>/dev/null || { echo "soak.sh: the server died; its log:" >&2; show_log; exit 1; }
    sample "$now"
    [ "$now" -ge "$secs" ] && break
done
failed=0
for p in $pids; do wait "$p" || failed=1; done
touch "$out/churn.stop"
wait "$churn_pid" || { echo "soak.sh: the churn failed" >&2; failed=1; }
churn_pid=
sleep 2
sample "$(( $(date +%s) - start ))"
cached=$(http_get /metrics | grep "^rrnserve_prompt_cache_tokens_total{model=\"$shared_model\"}" || true)
kill "$server_pid"
stopped=0
wait "$server_pid" || stopped=$?
server_pid=
wait "$filter_pid"
if [ "$stopped" -ne 0 ]; then
    echo "soak.sh: the server did not stop cleanly (exit $stopped); its log:" >&2
    show_log
    failed=1
fi

echo "loadgen results:"
for n in classify generate stream completions score attention; do
    printf '  %-9s %s\n' "$n" "$(cat "$out/$n.json")"
done
echo "prompt tokens from the cache: ${cached:-none}"
read -r reloads scrapes left <"$out/churn.txt" || reloads=0 scrapes=0 left=0
echo "churn: $reloads reloads, $scrapes scrapes of /metrics, $left clients that left a stream"
echo "server log, requests by status:"
sort -rn "$out/requests.txt" | sed 's/^/  /'
echo "samples (seconds, VmRSS kB, fds, threads):"
sed 1d "$out/samples.csv" | sed 's/^/  /'
bad=$(awk '$4 != 200 && $4 != 503 && !($4 == 499 && $3 == "/generate") {n += $1} END {print n + 0}' "$out/requests.txt")
gone=$(awk '$4 == 499 {n += $1} END {print n + 0}' "$out/requests.txt")
conn=$(awk '{ while (match($0, /"conn":[0-9]+/)) { s += substr($0, RSTART + 7, RLENGTH - 7); $0 = substr($0, RSTART + RLENGTH) } }
            END { print s + 0 }' "$out"/*.json)
first_fds=$(sed -n 2p "$out/samples.csv" | cut -d, -f3)
last_fds=$(tail -1 "$out/samples.csv" | cut -d, -f3)
echo "errors other than 503 (and 499) in the server log: $bad; connection errors at the clients: $conn"
echo "requests logged 499: $gone, for $left clients that left a stream"
echo "fds at the start $first_fds, at the end (clients gone) $last_fds"
[ "$failed" -eq 0 ] && [ "$bad" -eq 0 ] && [ "$conn" -eq 0 ] && [ "$last_fds" -le "$first_fds" ] && [ "$reloads" -gt 0 ] &&
    [ "$scrapes" -gt 0 ] && [ "$left" -gt 0 ] && [ "$gone" -eq "$left" ]
