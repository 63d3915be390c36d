#!/usr/bin/env bash
# Builds everything (CUDA code too when nvcc is present) and runs the test suite, then rebuilds
# the parsers' tests under AddressSanitizer + UndefinedBehaviorSanitizer and runs them again.
# GPU tests skip themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
scripts/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$JOBS"
ctest --test-dir build --output-on-failure -j"$JOBS"

cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQFORGE_SANITIZE=ON -DQFORGE_CUDA=OFF
cmake --build build-asan -j"$JOBS"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan -L parser -E FullHeldoutPerplexity --output-on-failure -j"$JOBS"
