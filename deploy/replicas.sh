#!/usr/bin/env bash
# replicas.sh start N [PORT] | stop | status - runs N `rrnserve serve`
# replicas on loopback ports the system picks, and an nginx in front of them
# on 127.0.0.1:PORT (default 8080) that balances them as deploy/nginx.conf
# says (least connections, failed requests retried on another replica,
# /generate streamed unbuffered).  Everything runs as the current user, no
# root needed: nginx's config, pid, logs and temporary files, and the
# replicas' logs, are in a work folder.  `stop` ends what `start` started
# (and only that: the processes named in the work folder), replicas
# gracefully (SIGTERM: they answer what they accepted).
#
# Environment:
#   RRN_WORK        the work folder (default ${TMPDIR:-/tmp}/rrnserve-replicas.UID)
#   RRN_BIN         the rrnserve binary (default: ./rrnserve of this repository)
#   RRN_MODELS      the models folder (default: models/ of this repository)
#   RRN_ARGS        more options for every replica, split at spaces
#                   (e.g. "--device cpu --threads 2")
#   RRN_GPUS        the GPUs to spread the replicas over, split at spaces:
#                   indices as nvidia-smi numbers them, or UUIDs (GPU-...,
#                   MIG-...), e.g. "0 1 2 3"; replica i runs with
#                   CUDA_VISIBLE_DEVICES set to the ((i - 1) mod count)-th,
#                   so that each uses one GPU and together they use all.
#                   Unset, every replica sees every GPU, and a CUDA replica
#                   uses the first.
#   RRN_HOST        where nginx listens (default 127.0.0.1)
#   RRN_TLS_PORT, RRN_TLS_CERT, RRN_TLS_KEY
#                   also HTTPS on RRN_TLS_PORT with this certificate and key
#                   (PEM files), from deploy/nginx-tls.conf
#   NGINX           the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)
#   RRN_START_TIMEOUT_S   how long a replica may take to load its models (120)
#   RRN_STOP_TIMEOUT_S    how long stop waits for each process to end (60)
#   RRN_WATCH_PID   stop everything once this process is gone (for tests,
#                   so that nothing outlives them); checked every second for
#                   at most RRN_WATCH_MAX_S (3600) seconds
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
work=${RRN_WORK:-${TMPDIR:-/tmp}/rrnserve-replicas.$(id -u)}
bin=${RRN_BIN:-$root/rrnserve}
models=${RRN_MODELS:-$root/models}
host=${RRN_HOST:-127.0.0.1}
start_timeout=${RRN_START_TIMEOUT_S:-120}
replica="serve --models"
stop_timeout=${RRN_STOP_TIMEOUT_S:-60}

die() {
    echo "replicas.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: replicas.sh start N [PORT] | stop | status" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

find_nginx() {
    if [ -n "${NGINX:-}" ]; then
        echo "$NGINX"
    elif command -v nginx >/dev/null 2>&1; then
        command -v nginx
    elif [ -x /usr/sbin/nginx ]; then
        echo /usr/sbin/nginx
    else
        return 1
    fi
}

# alive PID WORD: PID is a live process (not a zombie) whose command line
# holds WORD (nginx, or $replica for a replica), so that a reused pid is
# never taken for ours.
alive() {
    local cmd
    [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$2"* ]]
}

# wait_gone SECONDS PID WORD [PID WORD...]: waits (bounded) until no PID
# is alive; 0 when none is.
wait_gone() {
    local limit=$1 t k any
    shift
    local args=("$@")
    for ((t = 0; t < limit * 10; t++)); do
        any=0
        for ((k = 0; k < ${#args[@]}; k += 2)); do
            alive "${args[k]}" "${args[k + 1]}" && any=1
        done
        [ "$any" -eq 0 ] && return 0
        sleep 0.1
    done
    return 1
}

# GET PATH from nginx over plain HTTP (bash's /dev/tcp); prints the status.
probe() {
    local addr=$host line=""
    [ "$addr" = 0.0.0.0 ] && addr=127.0.0.1
    [ "$addr" = "::" ] && addr=::1
    exec 3<>"/dev/tcp/$addr/$port" 2>/dev/null || return 1
    printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$1" >&3
    IFS= read -r -t 10 line <&3 || true
    exec 3<&-
    line=${line#HTTP/1.? }
    echo "${line%% *}"
}

stop_all() {
    [ -d "$work" ] || {
        echo "replicas.sh: nothing in $work"
        return 0
    }
    local pid k left=()
    # The watchdog, unless it is the one stopping everything (this process,
    # when bash ran the watchdog's last command in its place, or its parent).
    pid=$(cat "$work/watch.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$pid" != "$$" ] && [ "$pid" != "$PPID" ] && alive "$pid" replicas.sh; then
        kill "$pid" 2>/dev/null || true
    fi
    # nginx: graceful (QUIT), then fast (TERM), then KILL of the master and
    # of its workers, which outlive a killed master.
    pid=$(cat "$work/nginx.pid" 2>/dev/null || true)
    if alive "$pid" nginx; then
        local workers
        workers=$(ps -o pid= --ppid "$pid" 2>/dev/null | tr -s ' \n' ' ' || true)
        kill -QUIT "$pid" 2>/dev/null || true
        if ! wait_gone 10 "$pid" nginx; then
            kill -TERM "$pid" 2>/dev/null || true
            if ! wait_gone "$stop_timeout" "$pid" nginx; then
                echo "replicas.sh: nginx $pid did not stop; killing it" >&2
                for w in $pid $workers; do
                    if alive "$w" nginx; then kill -KILL "$w" 2>/dev/null || true; fi
                done
            fi
        fi
    fi
    # The replicas: SIGTERM lets each answer what it accepted.
    if [ -f "$work/replicas" ]; then
        local i port
        while read -r i pid port; do
            if alive "$pid" "$replica"; then
                kill -TERM "$pid" 2>/dev/null || true
                left+=("$pid" "$replica")
            fi
        done <"$work/replicas"
        if [ ${#left[@]} -gt 0 ] && ! wait_gone "$stop_timeout" "${left[@]}"; then
            for ((k = 0; k < ${#left[@]}; k += 2)); do
                pid=${left[k]}
                if alive "$pid" "$replica"; then
                    echo "replicas.sh: replica $pid did not stop; killing it" >&2
                    kill -KILL "$pid" 2>/dev/null || true
                fi
            done
        fi
    fi
    rm -f "$work/replicas" "$work/nginx.pid" "$work/watch.pid"
    echo "replicas.sh: stopped (logs in $work)"
}

status() {
    local pid i port
    pid=$(cat "$work/nginx.pid" 2>/dev/null || true)
    if alive "$pid" nginx; then echo "nginx: pid $pid"; else echo "nginx: not running"; fi
    [ -f "$work/replicas" ] || return 0
    while read -r i pid port; do
        if alive "$pid" "$replica"; then
            echo "replica $i: pid $pid, http://127.0.0.1:$port"
        else
            echo "replica $i: pid $pid, gone"
        fi
    done <"$work/replicas"
}

start() {
    local n=$1 i t pid line
    port=${2:-8080}
    if ! is_uint "$n" || [ "$n" -lt 1 ] || [ "$n" -gt 64 ]; then die "N must be from 1 to 64, not '$n'"; fi
    if ! is_uint "$port" || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then die "PORT must be from 1 to 65535"; fi
    [[ $work =~ ^[A-Za-z0-9_./-]+$ ]] || die "the work folder '$work' may hold only [A-Za-z0-9_./-]"
    local gpus=() g
    read -r -a gpus <<<"${RRN_GPUS:-}"
    for g in "${gpus[@]}"; do
        [[ $g =~ ^[A-Za-z0-9/-]+$ ]] || die "RRN_GPUS must list GPU indices or UUIDs, not '$g'"
    done
    local nginx
    nginx=$(find_nginx) || die "nginx not found (Debian package nginx)"
    [ -x "$bin" ] || die "no rrnserve binary at $bin (make rrnserve, or set RRN_BIN)"
    [ -d "$models" ] || die "no models folder $models (set RRN_MODELS)"
    pid=$(cat "$work/nginx.pid" 2>/dev/null || true)
    if alive "$pid" nginx || [ -s "$work/replicas" ]; then
        die "already running in $work: replicas.sh stop first"
    fi
    mkdir -p "$work/tmp"
    rm -f "$work"/replica-*.log "$work/error.log" "$work/access.log"

    # From here on, a failure stops whatever was started.
    trap 'stop_all >/dev/null 2>&1 || true' EXIT
    : >"$work/replicas"
    local pids=()
    for ((i = 1; i <= n; i++)); do
        local visible=()
        [ ${#gpus[@]} -eq 0 ] || visible=("CUDA_VISIBLE_DEVICES=${gpus[(i - 1) % ${#gpus[@]}]}")
        # shellcheck disable=SC2086 # RRN_ARGS is split on purpose
        env "${visible[@]}" "$bin" serve --models "$models" --host 127.0.0.1 --port 0 ${RRN_ARGS:-} \
            </dev/null >"$work/replica-$i.log" 2>&1 &
        pids+=($!)
        echo "$i $! 0" >>"$work/replicas"
    done
    # Each replica logs its port once its models are loaded.
    local ports=() want="listening on http://127.0.0.1:"
    for ((i = 1; i <= n; i++)); do
        pid=${pids[i - 1]} line=""
        for ((t = 0; t < start_timeout * 10; t++)); do
            line=$(grep -m1 -F "$want" "$work/replica-$i.log" || true)
            [ -n "$line" ] && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if [ -z "$line" ]; then
            tail -n 20 "$work/replica-$i.log" >&2 || true
            die "replica $i did not start (log: $work/replica-$i.log)"
        fi
        ports+=("${line##*"$want"}")
    done
    : >"$work/replicas.new"
    : >"$work/upstreams.conf.new"
    for ((i = 1; i <= n; i++)); do
        echo "$i ${pids[i - 1]} ${ports[i - 1]}" >>"$work/replicas.new"
        echo "server 127.0.0.1:${ports[i - 1]} max_fails=1 fail_timeout=10s;" >>"$work/upstreams.conf.new"
    done
    mv "$work/replicas.new" "$work/replicas"
    mv "$work/upstreams.conf.new" "$work/upstreams.conf"

    # nginx's config from the templates.
    local listen_host=$host user_line=""
    [[ $host == *:* ]] && listen_host="[$host]"
    [ "$(id -u)" -eq 0 ] && user_line="user $(id -un) $(id -gn);"
    if [ -n "${RRN_TLS_CERT:-}" ]; then
        if [ -z "${RRN_TLS_KEY:-}" ] || [ -z "${RRN_TLS_PORT:-}" ]; then
            die "RRN_TLS_CERT needs RRN_TLS_KEY and RRN_TLS_PORT"
        fi
        is_uint "$RRN_TLS_PORT" || die "RRN_TLS_PORT must be a port number"
        if [ ! -r "$RRN_TLS_CERT" ] || [ ! -r "$RRN_TLS_KEY" ]; then die "cannot read $RRN_TLS_CERT or $RRN_TLS_KEY"; fi
        local cert key
        cert=$(realpath "$RRN_TLS_CERT")
        key=$(realpath "$RRN_TLS_KEY")
        [[ $cert$key =~ ^[A-Za-z0-9_./-]+$ ]] || die "certificate paths may hold only [A-Za-z0-9_./-]"
        sed -e "s|@HOST@|$listen_host|g" -e "s|@TLS_PORT@|$RRN_TLS_PORT|g" -e "s|@CERT@|$cert|g" \
            -e "s|@KEY@|$key|g" "$here/nginx-tls.conf" >"$work/tls.conf"
    else
        echo "# no TLS: replicas.sh was started without RRN_TLS_CERT" >"$work/tls.conf"
    fi
    sed -e "s|@WORK@|$work|g" -e "s|@HOST@|$listen_host|g" -e "s|@PORT@|$port|g" \
        -e "s|@USER@|$user_line|g" "$here/nginx.conf" >"$work/nginx.conf"
    local out
    out=$("$nginx" -t -q -p "$work/" -c "$work/nginx.conf" -e "$work/error.log" 2>&1) || {
        echo "$out" >&2
        die "nginx rejects $work/nginx.conf"
    }
    "$nginx" -p "$work/" -c "$work/nginx.conf" -e "$work/error.log" </dev/null >>"$work/nginx.out" 2>&1 ||
        die "nginx did not start: $(tail -n 5 "$work/error.log" 2>/dev/null)"
    local status=""
    for ((t = 0; t < 100; t++)); do
        pid=$(cat "$work/nginx.pid" 2>/dev/null || true)
        if alive "$pid" nginx; then
            status=$(probe /healthz || true)
            [ "$status" = 200 ] && break
        fi
        sleep 0.1
    done
    [ "$status" = 200 ] || die "nginx does not answer on $host:$port: $(tail -n 5 "$work/error.log" 2>/dev/null)"

    if [ -n "${RRN_WATCH_PID:-}" ]; then
        local watched=$RRN_WATCH_PID max=${RRN_WATCH_MAX_S:-3600}
        (
            for ((s = 0; s < max; s++)); do
                kill -0 "$watched" 2>/dev/null || break
                sleep 1
            done
            RRN_WATCH_PID="" RRN_WORK=$work "$here/replicas.sh" stop
        ) </dev/null >"$work/watch.log" 2>&1 &
        echo $! >"$work/watch.pid"
    fi
    trap - EXIT
    echo "nginx on http://$listen_host:$port (pid $pid)${RRN_TLS_PORT:+, https://$listen_host:$RRN_TLS_PORT}"
    status | tail -n +2
    [ "$(probe /readyz || true)" = 200 ] || echo "replicas.sh: /readyz is not 200: no model loaded?" >&2
    echo "work folder: $work"
}

case "${1:-}" in
start)
    if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
    start "$2" "${3:-8080}"
    ;;
stop) stop_all ;;
status) status ;;
*) usage ;;
esac
