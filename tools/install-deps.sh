#!/usr/bin/env bash
# install-deps.sh [--bench] [--fuzz] [--valgrind] - install the Debian
# packages rrnserve needs to build and test (and, with --bench, to run the
# PyTorch side of the benchmarks; with --fuzz, clang and its libFuzzer
# runtime for make fuzz; with --valgrind, valgrind for make test-valgrind),
# skipping the ones already installed so it costs nothing on a machine that
# has them.  Uses sudo when not run as root.
set -euo pipefail
pkgs=(build-essential pkg-config libcjson-dev libssl-dev libcmocka-dev libopenblas-dev liblapacke-dev
      libopenblas0-pthread libunistring-dev libmicrohttpd-dev libpng-dev chromium
      nginx openssl systemd python3 python3-yaml prometheus)
for opt in "$@"; do
    case "$opt" in
    --bench) pkgs+=(python3 python3-numpy python3-torch) ;;
    --fuzz) pkgs+=(clang libclang-rt-dev) ;;
    --valgrind) pkgs+=(valgrind) ;;
    *) echo "install-deps.sh: unknown option $opt" >&2; exit 2 ;;
    esac
done
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
