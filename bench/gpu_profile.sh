#!/bin/bash
# Profile and tune the quantized decode GEMV on a GPU machine (after `bench/gpu_run.sh build`):
# Nsight Compute stall breakdown of one 4096x4096 and one 4096x11008 EXL2 4-bit GEMV, then a sweep
# of QFORGE_QGEMV_STAGES x QFORGE_QGEMV_BPS (units in flight per warp, blocks per SM the K split
# aims for) on the 7B decode benchmark and the per-layer GEMV times. NCU=0 skips the profile.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qforge-gpu}
mkdir -p "$OUT"
B=build-gpu
export LD_LIBRARY_PATH=$PWD/.gpu-deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__grid_size
for s in long_scoreboard short_scoreboard barrier wait math_pipe_throttle mio_throttle lg_throttle not_selected selected no_instruction dispatch_stall membar branch_resolving drain; do
  M=$M,smsp__average_warp_latency_issue_stalled_${s}.ratio
done
for spec in $([ "${NCU:-1}" = 0 ] || echo "60:4096x4096 240:4096x11008"); do
  spec=${spec/:/ }
  set -- $spec
  ncu --metrics "$M" -k regex:qgemv_fused --launch-skip "$1" --launch-count 1 \
    $B/tests/test_gpu_quant --gtest_filter=GpuQuant.GemvBandwidthReport > "$OUT/ncu_$2.txt" 2>&1
  echo "== ncu $2"; grep -E "^\s+(gpu__|dram__|sm__|smsp__|launch__)" "$OUT/ncu_$2.txt" | awk '{print $1, $(NF)}'
done
for st in 4 8; do
  QFORGE_QGEMV_STAGES=$st $B/tests/test_gpu_quant --gtest_filter=GpuQuant.Fused*:GpuQuantModel.*Greedy* 2>&1 | grep -E "^\[  (PASSED|FAILED)" | sed "s/^/stages $st: /"
  for bps in ${BPS_LIST:-3 4 6}; do
    echo "== STAGES=$st BPS=$bps"
    QFORGE_QGEMV_STAGES=$st QFORGE_QGEMV_BPS=$bps $B/qforge bench --random llama2-7b --format exl2:4.0 -p 0 -n 128 -r 2 --depth 0 2>&1 | grep -E "^\| tg"
    QFORGE_QGEMV_STAGES=$st QFORGE_QGEMV_BPS=$bps $B/tests/test_gpu_quant --gtest_filter=GpuQuant.GemvBandwidthReport 2>&1 | grep -E "GEMV exl2 4b "
  done
done
