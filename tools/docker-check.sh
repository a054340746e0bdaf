#!/bin/sh
# docker-check.sh - build both images of deploy/Dockerfile and run them:
# each serves the shipped models as nobody, and the CUDA image loads its
# CUDA library, runtime and cuBLAS (with the toolkit's stub of the driver
# where the host has no GPU: it must then say `no CUDA GPU is available`,
# which only a library that loaded can say), or runs on the GPU where the
# host has one and NVIDIA's container toolkit.  By hand, not in `make
# test` (it needs a Docker daemon and the network, and takes minutes):
#
#   tools/docker-check.sh          (DOCKER=... for another client)
#
# Where the registry cannot be reached, stand-ins are made: debian:12 (and
# -slim) from debootstrap, and the CUDA image from this host's toolkit
# (CUDA_HOME, default /usr/local/cuda) laid out as NVIDIA's images lay it
# out (/usr/local/cuda -> /etc/alternatives/cuda -> cuda-13.x, lib64 ->
# targets/x86_64-linux/lib).
set -eu
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
export DOCKER_BUILDKIT=1
tmp=$(mktemp -d)
containers=
cleanup() {
    for c in $containers; do $DOCKER rm -f "$c" >/dev/null 2>&1 || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "docker-check: FAILED: $*" >&2; exit 1; }

have_image() { $DOCKER image inspect "$1" >/dev/null 2>&1 || $DOCKER pull -q "$1" >/dev/null 2>&1; }

if ! have_image debian:12 || ! have_image debian:12-slim; then
    echo "docker-check: no debian:12 from the registry; making it with debootstrap"
    debootstrap --variant=minbase bookworm "$tmp/debian" http://deb.debian.org/debian >"$tmp/debootstrap.log" 2>&1 ||
        fail "debootstrap (log: $(tail -3 "$tmp/debootstrap.log"))"
    rm -f "$tmp/debian/etc/apt/sources.list"
    cat >"$tmp/debian/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$tmp/debian/var/lib/apt/lists/"* "$tmp/debian/var/cache/apt/"*.bin
    tar -C "$tmp/debian" -c . | $DOCKER import - debian:12 >/dev/null
    $DOCKER tag debian:12 debian:12-slim
    rm -rf "$tmp/debian"
fi

cuda_image=$(sed -n 's/^ARG CUDA_IMAGE=//p' deploy/Dockerfile)
if ! have_image "$cuda_image"; then
    src=$(readlink -f "${CUDA_HOME:-/usr/local/cuda}")
    [ -x "$src/bin/nvcc" ] || fail "neither $cuda_image nor a CUDA toolkit here (CUDA_HOME)"
    echo "docker-check: no $cuda_image from the registry; standing in for it with $src"
    cuda_image=rrnserve-check/cuda-toolkit:local
    v=$(basename "$src")
    top=$tmp/toolkit/usr/local/$v
    mkdir -p "$top/targets/x86_64-linux/lib" "$tmp/toolkit/etc/alternatives"
    cp -a "$src/bin" "$src/nvvm" "$top/"
    cp -a "$(readlink -f "$src/include")" "$top/targets/x86_64-linux/include"
    cp -a "$src/lib64/"libcudart.so* "$src/lib64/"libcublas.so* "$src/lib64/"libcublasLt.so* "$src/lib64/stubs" \
        "$top/targets/x86_64-linux/lib/"
    ln -s targets/x86_64-linux/lib "$top/lib64"
    ln -s targets/x86_64-linux/include "$top/include"
    ln -s "/usr/local/$v" "$tmp/toolkit/etc/alternatives/cuda"
    ln -s /etc/alternatives/cuda "$tmp/toolkit/usr/local/cuda"
    tar -C "$tmp/toolkit" -c . | $DOCKER import - "$cuda_image" >/dev/null
    rm -rf "$tmp/toolkit"
fi

for target in cpu cuda; do
    echo "docker-check: building the $target image"
    $DOCKER build -q --network host --build-arg CUDA_IMAGE="$cuda_image" -f deploy/Dockerfile \
        --target "$target" -t "rrnserve-check:$target" . >"$tmp/build-$target.log" 2>&1 ||
        fail "docker build --target $target: $(tail -20 "$tmp/build-$target.log")"
    echo "docker-check: rrnserve-check:$target is $(($($DOCKER image inspect -f '{{.Size}}' "rrnserve-check:$target") / 1000000)) MB"
done

# The driver's stub, from the toolkit image (what a container without a
# GPU has in place of the driver the container toolkit would mount).
stub_container=$($DOCKER create "$cuda_image" /none)
$DOCKER cp -L "$stub_container:/usr/local/cuda/lib64/stubs/libcuda.so" "$tmp/libcuda.so.1"
$DOCKER rm "$stub_container" >/dev/null

# serve IMAGE EXPECTED-LOG [docker run options...]: starts the image's
# default command as deploy/k8s runs it (a read-only root file system, no
# capabilities), waits (30 s at most) for /readyz, checks the log holds
# EXPECTED-LOG and that it classifies and generates, then removes it.
serve() {
    image=$1 expect=$2
    shift 2
    c=$($DOCKER run -d --read-only --cap-drop ALL --security-opt no-new-privileges -p 127.0.0.1::8080 "$@" "$image")
    containers="$containers $c"
    port=$($DOCKER port "$c" 8080/tcp | sed -n '1s/.*://p')
    i=0
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
        i=$((i + 1))
        [ $i -lt 60 ] || fail "$image $*: not ready in 30 s: $($DOCKER logs "$c" 2>&1 | tail -5)"
        sleep 0.5
    done
    $DOCKER logs "$c" 2>&1 | grep -q "$expect" ||
        fail "$image $*: the log does not say '$expect': $($DOCKER logs "$c" 2>&1)"
    [ "$($DOCKER top "$c" -o pid,uid | awk 'NR == 2 { print $2 }')" = 65534 ] ||
        fail "$image: the server does not run as nobody"
    out=$(curl -s "http://127.0.0.1:$port/classify" -d '{"model": "sentiment", "text": "a fine day"}')
    echo "$out" | grep -q '"label"' || fail "$image $*: /classify answered $out"
    out=$(curl -s "http://127.0.0.1:$port/generate" -d '{"model": "austen", "prompt": "It is a truth", "max_tokens": 16, "seed": 1}')
    echo "$out" | grep -q '"tokens":16' || fail "$image $*: /generate answered $out"
    echo "docker-check: $image $*: ready, '$($DOCKER logs "$c" 2>&1 | grep -o "$expect.*" | head -1)', classifies and generates"
    $DOCKER rm -f "$c" >/dev/null
}

serve rrnserve-check:cpu "device auto chose the cpu: this binary was built without CUDA"
serve rrnserve-check:cuda "device auto chose the cpu: no CUDA driver"
serve rrnserve-check:cuda "device auto chose the cpu: no CUDA GPU is available" \
    -v "$tmp/libcuda.so.1:/usr/lib/x86_64-linux-gnu/libcuda.so.1:ro"
out=$($DOCKER run --rm -v "$tmp/libcuda.so.1:/usr/lib/x86_64-linux-gnu/libcuda.so.1:ro" rrnserve-check:cuda \
    serve --models /usr/share/rrnserve/models --device cuda 2>&1) && fail "serve --device cuda without a GPU started"
echo "$out" | grep -q "device cuda: no CUDA GPU is available" || fail "serve --device cuda without a GPU said: $out"
echo "docker-check: rrnserve-check:cuda --device cuda without a GPU: exits, '$(echo "$out" | grep -o 'device cuda:.*')'"

if command -v nvidia-smi >/dev/null 2>&1; then
    serve rrnserve-check:cuda "serving 2 model(s) on device cuda" --gpus all
else
    echo "docker-check: skipped the GPU run (no nvidia-smi here)"
fi
echo "docker-check: passed"
