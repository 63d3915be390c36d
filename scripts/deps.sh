#!/usr/bin/env bash
# Installs the Debian packages qforge builds against (skips those already installed).
#   scripts/deps.sh          what the build and tests need
#   scripts/deps.sh fuzz     and what scripts/fuzz.sh needs: clang, its libFuzzer/sanitizer
#                            runtimes (libclang-rt-dev: only a Recommends of clang) and
#                            llvm-symbolizer (llvm) for readable stack traces
set -euo pipefail
PKGS="build-essential cmake ninja-build pkg-config nlohmann-json3-dev libcli11-dev libpcre2-dev \
libutf8proc-dev libgtest-dev libopenblas-dev libsnappy-dev zlib1g-dev libzstd-dev"
if [ "${1:-}" = "fuzz" ]; then PKGS="$PKGS clang libclang-rt-dev llvm"; fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
