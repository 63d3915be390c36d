#!/usr/bin/env bash
# Builds everything (CUDA code too when nvcc is present) and runs the test suite, then rebuilds
# the parsers' tests under AddressSanitizer + UndefinedBehaviorSanitizer and runs them again,
# then fuzzes every parser for a minute each (scripts/fuzz.sh, clang; README "Reliability").
# GPU tests skip themselves on machines without a GPU.
#   QFORGE_SKIP_FUZZ=1 scripts/test.sh      without the fuzz stage (local runs)
#   QFORGE_FUZZ_SECONDS=N                   seconds per fuzz target (default 60)
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

if [ "${QFORGE_SKIP_FUZZ:-0}" = "1" ]; then
  echo "test.sh: fuzz stage skipped (QFORGE_SKIP_FUZZ=1)"
else
  scripts/deps.sh fuzz
  scripts/fuzz.sh "${QFORGE_FUZZ_SECONDS:-60}"
fi
