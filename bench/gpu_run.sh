#!/bin/bash
# Build, test and benchmark the CUDA backend on a bare GPU machine in one go.
#   usage (repository root, with .gpu-deps and .devdata carried along):  bench/gpu_run.sh [steps]
#   steps: any of build tests engine sampler conc prefix b1 qreport kprof qtests limits sanitize bench bench3 qbench mixbench gptq quality convert7b convert7b8 (default: build tests bench)
#   limits: issue 9's device paths (non-finite logits in the argmax/sampler kernels, the device memory check)
#   gptq: configures if needed, builds and runs test_gpu_gptq and bench/gptq_bench alone
# .gpu-deps: ../shared/scripts/gpu-deps.sh nlohmann-json3-dev libcli11-dev libpcre2-dev libpcre2-8-0 \
#            libutf8proc-dev libutf8proc2 libgtest-dev libzstd-dev libzstd1 zlib1g-dev zlib1g \
#            libsnappy-dev libsnappy1v5
# .devdata:  models/{stories260K-hf,testmodel-llama-20m} copied from the shared data (R7B_TOKENIZER: another
#            folder with the Llama tokenizer for the random 7B, when testmodel-llama-20m does not travel).
# Logs go to $OUT (or /tmp/qforge-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qforge-gpu}
mkdir -p "$OUT"
STEPS=${*:-build tests bench}
D=$PWD/.gpu-deps/usr
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PKG_CONFIG_PATH=$D/lib/x86_64-linux-gnu/pkgconfig:$D/share/pkgconfig
export QFORGE_TEST_DATA=$PWD/.devdata
for f in "$D"/lib/x86_64-linux-gnu/pkgconfig/*.pc "$D"/share/pkgconfig/*.pc; do
  [ -f "$f" ] && sed -i "s|^prefix=/usr\$|prefix=$D|" "$f"
done
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
configure_once() {  # for the steps that may run without `build`
  [ -f build-gpu/build.ninja ] && return 0
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nvcc --version | tail -1; } 2>&1 | tee "$OUT/env.txt"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="$D" -DCMAKE_INCLUDE_PATH="$D/include" >"$OUT/configure.txt" 2>&1 || { tail -30 "$OUT/configure.txt"; exit 1; }
}

if has build; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; which pkg-config cmake ninja nvcc; nvcc --version | tail -1; } 2>&1 | tee "$OUT/env.txt"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="$D" -DCMAKE_INCLUDE_PATH="$D/include" >"$OUT/configure.txt" 2>&1 || { tail -30 "$OUT/configure.txt"; exit 1; }
  ninja -C build-gpu -j16 qforge test_gpu_kernels test_gpu_model test_gpu_quant test_gpu_sampler test_gpu_engine >"$OUT/build.txt" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.txt" | head -60; exit 1; }
  echo "build ok"
fi
B=build-gpu
if has tests; then
  $B/tests/test_gpu_kernels 2>&1 | tee "$OUT/test_kernels.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|rel_err|error" | head -40
  $B/tests/test_gpu_model 2>&1 | tee "$OUT/test_model.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|Expected|Which is|differ|error" | head -40
fi
if has engine; then
  $B/tests/test_gpu_engine 2>&1 | tee "$OUT/test_engine.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|Expected|Which is|ppl:|prompt|error" | head -60
fi
if has conc; then
  # Many requests at once through the engine (issue 10): random Llama-2-7B, EXL2 4.0 and FP16.
  for f in exl2:4.0 fp16; do
    echo "== $f llama2-7b concurrency"
    $B/qforge bench --random llama2-7b --format $f --concurrency 1,8,32,64 -p ${CONC_P:-256} -n ${CONC_N:-128} 2>&1
  done | tee "$OUT/bench_conc${CONC_P:-256}.txt" | grep -E "^==|^\||^concurrency|prompts of|error|Error"
fi
if has prefix; then
  # Prefix sharing (issue 10): TTFT of a request whose 1000-token prefix is cached, against cold.
  $B/qforge bench --random llama2-7b --format exl2:4.0 --prefix-sharing 1000 -r 3 2>&1 | tee "$OUT/bench_prefix.txt" |
    grep -E "^\||prefix sharing|error|Error"
fi
if has qreport; then
  configure_once
  ninja -C build-gpu -j16 test_gpu_quant >/dev/null 2>&1
  $B/tests/test_gpu_quant --gtest_filter='*Bandwidth*' 2>&1 | tee "$OUT/test_quant_report.txt" | grep -E "GEMV|GEMM|FAILED"
fi
if has kprof; then
  # Where a 64-stream engine step's time goes (EXL2 4.0 unless KPROF_FORMAT): every kernel of a
  # stretch of decode steps timed alone by Nsight Compute, summed per kernel.
  if command -v ncu >/dev/null; then
    ncu --cache-control none --launch-skip ${KPROF_SKIP:-40000} --launch-count ${KPROF_COUNT:-1200} --metrics gpu__time_duration.sum --csv \
      $B/qforge bench --random llama2-7b --format ${KPROF_FORMAT:-exl2:4.0} --concurrency 64 -p 256 -n 128 \
      >"$OUT/kprof.csv" 2>"$OUT/kprof.err"
    python3 bench/kernel_summary.py "$OUT/kprof.csv" | tee "$OUT/kprof.txt"
  else
    echo "no ncu on this machine"
  fi
fi
if has b1; then
  # Batch-1 decode and pp512 of the three formats the engine work must not slow down.
  for f in exl2:4.0 gptq:4g128 fp16; do
    echo "== $f llama2-7b"; $B/qforge bench --random llama2-7b --format $f -p 512 -n 128 -r 3 --depth 0 2>&1
  done | tee "$OUT/bench_b1.txt" | grep -E "^==|^\| (pp|tg)|error|Error"
fi
if has limits; then
  configure_once
  ninja -C build-gpu -j16 qforge test_cli_errors_limits >"$OUT/build_limits.txt" 2>&1 || { grep -E "error" -A3 "$OUT/build_limits.txt" | head -40; exit 1; }
  $B/tests/test_cli_errors_limits --gtest_filter='*Gpu*:*NonFinite*:*Memory*' 2>&1 | tee "$OUT/test_limits.txt" |
    grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|wanted|error" | head -40
fi
if has qtests; then
  # The bandwidth lines stay in the log (the qreport step prints them): the call's output keeps room.
  $B/tests/test_gpu_quant 2>&1 | tee "$OUT/test_quant.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|rel_|ppl|top-10|error|fallback" | head -40
fi
if has sampler; then
  $B/tests/test_gpu_sampler 2>&1 | tee "$OUT/test_sampler.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|total variation" | head -30
fi
if has sanitize; then
  timeout 240 compute-sanitizer --tool memcheck --leak-check no $B/tests/test_gpu_kernels \
    --gtest_filter=-*OutOfMemory* 2>&1 | tee "$OUT/memcheck.txt" | grep -E "ERROR SUMMARY|PASSED|FAILED" | head
  timeout 420 compute-sanitizer --tool memcheck --leak-check no $B/tests/test_gpu_quant \
    --gtest_filter=-*Bandwidth*:*Perplexity* 2>&1 | tee "$OUT/memcheck_quant.txt" | grep -E "ERROR SUMMARY|PASSED|FAILED" | head
  timeout 120 compute-sanitizer --tool memcheck --leak-check no $B/tests/test_gpu_model 2>&1 |
    tee "$OUT/memcheck_model.txt" | grep -E "ERROR SUMMARY|PASSED|FAILED" | head
fi
if has bench; then
  $B/qforge bench --random llama2-7b -p 512 -n 128 -r 3 --depth 0,4096,16384 2>&1 | tee "$OUT/bench_7b.txt"
fi
if has bench3; then
  $B/qforge bench --random llama3-8b -p 512 -n 128 -r 3 --depth 0,4096 2>&1 | tee "$OUT/bench_8b.txt"
  { echo "== no graph"; $B/qforge bench --random llama2-7b -p 0 -n 64 -r 2 --depth 0 --no-graph;
    echo "== no PDL"; QFORGE_NO_PDL=1 $B/qforge bench --random llama2-7b -p 0 -n 128 -r 3 --depth 0;
    echo "== PDL again"; $B/qforge bench --random llama2-7b -p 0 -n 128 -r 3 --depth 0;
    echo "== bf16"; $B/qforge bench --random llama2-7b --format bf16 -p 512 -n 128 -r 3 --depth 0; } 2>&1 |
    tee "$OUT/bench_variants.txt" | grep -E "^==|^\| (pp|tg)"
fi
if has qbench; then
  # Quantized random models (EXL2 mixes as in bench/NOTES.md; GPTQ 4-bit g128, fp16 head).
  { echo "== exl2:4.0 llama2-7b"; $B/qforge bench --random llama2-7b --format exl2:4.0 -p 512 -n 128 -r 3 --depth 0,4096,16384
    for f in exl2:2.5 exl2:3.0 exl2:5.0 exl2:6.0 gptq:4g128 gptq:4g128-act; do
      echo "== $f llama2-7b"; $B/qforge bench --random llama2-7b --format $f -p 512 -n 128 -r 3 --depth 0; done
    echo "== gptq:4g128 llama2-7b depths"; $B/qforge bench --random llama2-7b --format gptq:4g128 -p 0 -n 128 -r 3 --depth 4096,16384
    echo "== exl2:4.0 llama3-8b"; $B/qforge bench --random llama3-8b --format exl2:4.0 -p 512 -n 128 -r 3 --depth 0,4096
    echo "== fp16 llama2-7b (same machine)"; $B/qforge bench --random llama2-7b -p 512 -n 128 -r 3 --depth 0; } 2>&1 |
    tee "$OUT/bench_quant.txt" | grep -E "^==|^\| (pp|tg)|read per token|qforge bench:|error|Error"
fi
if has mixbench; then
  # Decode speed of the bit-width mix qforge convert chose for the random 7B (.devdata/r7b-32-report.json,
  # or MIX_REPORT) beside the uniform exl2:4.0 mix, and the GEMV's launch knobs on both.
  configure_once
  ninja -C build-gpu -j16 qforge >"$OUT/build_mix.txt" 2>&1 || { grep -E "error" -A3 "$OUT/build_mix.txt" | head -40; exit 1; }
  rep=${MIX_REPORT:-.devdata/r7b-32-report.json}
  { for f in exl2:4.0 "exl2:$rep" exl2:3.0; do
      echo "== $f"; $B/qforge bench --random llama2-7b --format "$f" -p 0 -n 128 -r 2 --depth 0 --device cuda
      for knob in QFORGE_QGEMV_BPS=2 QFORGE_QGEMV_BPS=4 QFORGE_QGEMV_STAGES=8; do
        echo "== $f $knob"; env $knob $B/qforge bench --random llama2-7b --format "$f" -p 0 -n 128 -r 2 --depth 0 --device cuda; done
    done; } 2>&1 | tee "$OUT/bench_mix.txt" | grep -E "^==|^\| tg|error"
fi
if has gptq; then
  configure_once
  ninja -C build-gpu -j16 test_gpu_gptq gptq_bench >"$OUT/build_gptq.txt" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build_gptq.txt" | head -60; exit 1; }
  echo "gptq build ok"
  $B/tests/test_gpu_gptq 2>&1 | tee "$OUT/test_gptq.txt" |
    grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|Expected|Which is|hessian|inverse|quantize|pipeline|error" | head -80
  $B/bench/gptq_bench 2>&1 | tee "$OUT/bench_gptq.txt"
fi
if has quality; then
  # Issue 8's quality table on the GPU (.devdata: models/testmodel-llama-20m, heldout.txt, a Parquet file).
  configure_once
  ninja -C build-gpu -j16 qforge >"$OUT/build_quality.txt" 2>&1 || { grep -E "error" -A3 "$OUT/build_quality.txt" | head -40; exit 1; }
  bench/convert_quality.sh $B/qforge .devdata/models/testmodel-llama-20m .devdata/heldout.txt .devdata/calibration.parquet \
    "$OUT/quality" --device cuda 2>&1 | tee "$OUT/quality.md"
fi
# A random-weight Llama-2-7B folder of LAYERS layers in build-gpu/r7b-LAYERS (kept between calls on a
# warm machine), converted at 4.0 bpw (measurement included) into build-gpu/r7b-LAYERS-exl2-4.0, logged
# as $OUT/convert_NAME.txt with the device memory as the driver sees it (CUDA context and cuBLAS
# included), twice a second. The convert stops before the call's limit (R7B_CALL_LIMIT seconds after
# this script started, default 575) and the next call of the same step continues it with --resume.
convert_random_7b() {
  local layers=$1 name=$2 in=build-gpu/r7b-$1 out=build-gpu/r7b-$1-exl2-4.0 resume=""
  configure_once
  ninja -C build-gpu -j16 qforge make_random_model >"$OUT/build_$name.txt" 2>&1 || { grep -E "error" -A3 "$OUT/build_$name.txt" | head -40; exit 1; }
  echo "built at ${SECONDS} s"
  if [ ! -f "$in/config.json" ]; then
    rm -rf "$in" "$out"
    /usr/bin/time -f "make_random_model: %e s" $B/make_random_model --shape llama2-7b --layers "$layers" --out "$in" \
      --tokenizer-from "${R7B_TOKENIZER:-.devdata/models/testmodel-llama-20m}" 2>&1 | tail -2
  fi
  [ -f "$out/config.json" ] && { echo "$out: already converted"; return 0; }
  [ -d "$out/.qforge-convert" ] && resume=--resume
  local limit=$(( ${R7B_CALL_LIMIT:-575} - SECONDS ))
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 >>"$OUT/convert_${name}_memory.csv" 2>&1 &
  local smi=$!
  echo "convert ${resume:-fresh}, stopped after $limit s if unfinished"
  /usr/bin/time -f "convert: %e s wall, %M KB peak host RSS" timeout "$limit" $B/qforge convert -i "$in" -o "$out" -b 4.0 \
    --device cuda $resume 2>&1 | tee -a "$OUT/convert_$name.txt" | grep -vE "option [0-9]+/|: block [0-9]+/[0-9]+ \(|sampling: tokens" | tail -90
  kill $smi
  echo "driver-reported peak device memory during convert: $(awk -F', ' '{gsub(/ MiB/,"",$2); if ($2+0>m) m=$2+0} END {print m}' "$OUT/convert_${name}_memory.csv") MiB"
  ls -la "$out" | tee -a "$OUT/convert_$name.txt"
  [ -f "$out/config.json" ]
}
if has convert7b8; then
  # The same on an 8-layer (R7B_LAYERS) Llama-2-7B shape (real layer sizes, a quarter of the layers):
  # every stage but the head scales with the layer count, so it times the 32-layer run in a quarter.
  convert_random_7b "${R7B_LAYERS:-8}" 7b8 &&
  $B/qforge bench -m "build-gpu/r7b-${R7B_LAYERS:-8}-exl2-4.0" -p 512 -n 128 -r 1 --depth 0 --device cuda 2>&1 |
    tee "$OUT/bench_7b8.txt" | grep -E "^\| (pp|tg)|read per token|error"
fi
if has convert7b; then
  # A random-weight Llama-2-7B folder converted at 4.0 bpw (measurement included), then its decode
  # speed beside `bench --random --format exl2:4.0`.
  convert_random_7b 32 7b || exit 0
  { echo "== converted"; $B/qforge bench -m build-gpu/r7b-32-exl2-4.0 -p 512 -n 128 -r 1 --depth 0 --device cuda
    echo "== random exl2:4.0"; $B/qforge bench --random llama2-7b --format exl2:4.0 -p 512 -n 128 -r 1 --depth 0 --device cuda
    echo "== generate"; $B/qforge generate -m build-gpu/r7b-32-exl2-4.0 -p "Hello" -n 32 --temperature 0 --device cuda; } 2>&1 |
    tee "$OUT/bench_converted.txt" | grep -E "^==|^\| (pp|tg)|read per token|tok/s|error"
fi
