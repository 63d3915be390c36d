#!/usr/bin/env bash
# Fuzzes every parser (fuzz/, README "Reliability"): builds the libFuzzer targets with clang into
# build-fuzz, makes each target's seed corpus (fuzz/make_seeds.cpp: ../shared/data, fuzz/seeds,
# fuzz/regressions), replays the saved and generated regression inputs, then fuzzes each target
# for a fixed time. Exits non-zero on any finding, naming the target and the input that shows it.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60 (what CI runs)
#
# Environment:
#   FUZZ_TARGETS="config_json parquet"  only these targets (default: all)
#   FUZZ_JOBS=N          targets fuzzed at once (default: the number of cores)
#   FUZZ_BUILD_DIR=DIR   build folder (default: build-fuzz); corpora and findings go under it
#   FUZZ_ARGS="..."      extra libFuzzer flags, e.g. "-dict=... -use_value_profile=1"
#   CI=true              reproducible runs: a fixed seed (-seed=1) and a fixed number of inputs per
#                        target (its measured rate per second x SECONDS_PER_TARGET) instead of a
#                        time limit, so a CI result can be replayed exactly; without CI, a fresh
#                        seed and the time limit (longer campaigns explore further each run)
#   FUZZ_KEEP_GOING=1    fuzz on past findings (libFuzzer's fork mode) and report them all at
#                        the end, every saved input in build-fuzz/fuzz-runs/<target>/findings
# A longer campaign keeps its corpus in DIR/fuzz-runs/<target>/corpus between runs:
#   FUZZ_JOBS=2 scripts/fuzz.sh 3600
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${FUZZ_JOBS:-$(nproc)}
SHARED_DATA=${QFORGE_TEST_DATA:-$(cd .. && pwd)/shared/data}

# Each target with the longest input it may generate (-max_len): enough for its seeds.
ALL_TARGETS="config_json:16384 safetensors_file:65536 safetensors_dir:131072 tokenizer_json:65536
tokenizer_config:16384 vocab_merges:65536 quant_layer:65536 parquet:131072"
# Inputs per second of each target on the 2-core dev machine, two targets at once (CI=true runs
# this many x SECONDS_PER_TARGET inputs, with a fixed seed).
declare -A RATE=([config_json]=1300 [safetensors_file]=1100 [safetensors_dir]=500 [tokenizer_json]=480
  [tokenizer_config]=150 [vocab_merges]=600 [quant_layer]=2900 [parquet]=600)

# TEMPORARY (issue 9): targets that fail on known bugs being fixed on the other issue-9 branches
# (duplicate tensor names, shape [0, 2^64-1], control bytes in messages, JSON nesting, config
# garbage values, GPTQ bits, mixed EXL2+dense layers, vocab id 6e7; fuzz/regressions/ holds one
# input per bug). Their findings are printed but do not fail the run. EMPTY THIS LIST when those
# branches are merged: from then on every finding fails CI. FUZZ_KNOWN_UNTIL_MERGE="" overrides.
KNOWN_UNTIL_MERGE=${FUZZ_KNOWN_UNTIL_MERGE-""}

# Per input: 25 s (the replayed nesting cases parse megabytes under ASan); memory: 2 GB.
LIBFUZZER_FLAGS="-rss_limit_mb=2048 -timeout=25 -print_final_stats=1"
# A 64 MB quarantine instead of 256: the tokenizer targets allocate so much per input that fresh
# pages (page faults) halved their speed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0:handle_abort=1:quarantine_size_mb=64}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

for tool in clang clang++; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool not found (Debian: apt-get install clang libclang-rt-dev)" >&2; exit 1; }
done
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DQFORGE_FUZZ=ON -DQFORGE_TESTS=OFF -DQFORGE_CUDA=OFF -DQFORGE_NATIVE=OFF -DQFORGE_BLAS=OFF "${launcher[@]}" >/dev/null
cmake --build "$BUILD" --target fuzz_all -j"$(nproc)"
echo "fuzz.sh: targets built in $(( $(date +%s) - start )) s"

targets=()
for entry in $ALL_TARGETS; do
  name=${entry%%:*}
  if [ -z "${FUZZ_TARGETS:-}" ] || [[ " $FUZZ_TARGETS " == *" $name "* ]]; then targets+=("$entry"); fi
done

# Corpora: seeds are remade on every run; what the fuzzer found stays in fuzz-runs/<t>/corpus.
for entry in "${targets[@]}"; do
  name=${entry%%:*}
  rm -rf "$BUILD/fuzz-seeds/$name" "$BUILD/fuzz-replay/$name"
  "$BUILD/fuzz/fuzz_make_seeds" "$name" "${entry##*:}" "$SHARED_DATA" fuzz \
    "$BUILD/fuzz-seeds/$name" "$BUILD/fuzz-replay/$name"
done

# One target: replay its regression inputs, then fuzz. Writes its result to its folder.
run_target() {
  local name=$1 max_len=$2 dir="$BUILD/fuzz-runs/$1"
  local bin="$BUILD/fuzz/fuzz_$name" result=ok
  mkdir -p "$dir/corpus" "$dir/findings"
  rm -f "$dir/result" "$dir/findings/"*
  local replay=()
  for f in "$BUILD/fuzz-replay/$name"/* fuzz/regressions/"$name"/*; do
    [ -f "$f" ] && replay+=("$f")
  done
  if [ ${#replay[@]} -gt 0 ] &&
     ! "$bin" $LIBFUZZER_FLAGS -artifact_prefix="$dir/findings/" "${replay[@]}" >"$dir/replay.log" 2>&1; then
    result=replay
    if [ "${FUZZ_KEEP_GOING:-0}" != "1" ]; then echo "$result" >"$dir/result"; return; fi
  fi
  local keep_going=()
  if [ "${FUZZ_KEEP_GOING:-0}" = "1" ]; then
    keep_going=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
  fi
  local budget=(-max_total_time="$SECONDS_PER_TARGET")
  if [ "${CI:-}" = "true" ]; then budget=(-seed=1 -runs=$(( ${RATE[$name]:-500} * SECONDS_PER_TARGET ))); fi
  # shellcheck disable=SC2086
  if ! "$bin" $LIBFUZZER_FLAGS ${FUZZ_ARGS:-} "${keep_going[@]}" -max_len="$max_len" \
       "${budget[@]}" -artifact_prefix="$dir/findings/" \
       "$dir/corpus" "$BUILD/fuzz-seeds/$name" >"$dir/fuzz.log" 2>&1 ||
     [ -n "$(ls -A "$dir/findings")" ]; then
    result=fuzz
  fi
  echo "$result" >"$dir/result"
}

fuzz_start=$(date +%s)
running=0
for entry in "${targets[@]}"; do
  if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
  echo "fuzz.sh: fuzz_${entry%%:*}: replaying regressions, then fuzzing for ${SECONDS_PER_TARGET} s"
  run_target "${entry%%:*}" "${entry##*:}" &
  running=$((running + 1))
done
wait

failed=0
echo
echo "fuzz.sh: results (${SECONDS_PER_TARGET} s per target, $JOBS at once, $(( $(date +%s) - fuzz_start )) s of fuzzing)"
for entry in "${targets[@]}"; do
  name=${entry%%:*}
  dir="$BUILD/fuzz-runs/$name"
  result=$(cat "$dir/result" 2>/dev/null || echo "no result")
  log="$dir/fuzz.log"
  [ "$result" = "replay" ] && log="$dir/replay.log"
  execs=$(grep -m1 '^stat::number_of_executed_units' "$dir/fuzz.log" 2>/dev/null | awk '{print $2}' || true)
  [ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$dir/fuzz.log" 2>/dev/null | tail -1 | tr -d '#' || true)
  if [ "$result" = "ok" ]; then
    printf '  %-18s ok        %s runs, corpus %s files\n' "$name" "${execs:-?}" "$(ls "$dir/corpus" | wc -l)"
    continue
  fi
  known=""
  [[ " $KNOWN_UNTIL_MERGE " == *" $name "* ]] && known=" (KNOWN_UNTIL_MERGE: not failing the run)"
  printf '  %-18s FINDING   in the %s stage%s\n' "$name" "$result" "$known"
  if [ "$result" = "replay" ]; then  # libFuzzer names each input as it starts it
    echo "      input: $(grep '^Running: ' "$log" | tail -1 | cut -d' ' -f2-)"
  fi
  for f in "$dir/findings/"*; do [ -f "$f" ] && echo "      input: $f"; done
  grep -m1 -E '^SUMMARY|==qforge-fuzz== FINDING|ERROR: libFuzzer|runtime error|what\(\)' "$log" | cut -c1-300 | sed 's/^/      /' || true
  echo "      log: $log"
  echo "      reproduce: $BUILD/fuzz/fuzz_$name INPUT   minimize: $BUILD/fuzz/fuzz_$name -minimize_crash=1 -runs=10000 INPUT"
  [ -z "$known" ] && failed=1
done
echo "fuzz.sh: $(( $(date +%s) - start )) s in all"
exit $failed
