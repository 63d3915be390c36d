#!/bin/bash
# The quality table of issue 8: testmodel-llama-20m converted at 2.5 / 3.0 / 4.0 / 5.0 / 6.0 bpw,
# with the default (self-sampled) calibration and with a Parquet file, each measured against the
# FP16 model by `qforge ppl --kld-base` on the held-out protocol of measured-h100.md.
#   usage: bench/convert_quality.sh QFORGE MODEL_DIR HELDOUT_TXT PARQUET OUT_DIR [--device cuda]
# Measures once per calibration (--measure-only) and reuses it for every rate (--measurement), as
# ExLlamaV2's numbers were made. Prints a markdown table; logs go to OUT_DIR.
# QUALITY_CALS="parquet" (or "default") runs one calibration only.
set -uo pipefail
Q=$1; MODEL=$2; TEXT=$3; PARQUET=$4; OUT=$5; shift 5
mkdir -p "$OUT"
now() { date +%s.%N; }
echo "| calibration | bpw | decoder bpw | KLD | top-1 | PPL ratio | PPL | size MB | convert s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for cal in ${QUALITY_CALS:-default parquet}; do
  CAL=(); [ $cal = parquet ] && CAL=(-c "$PARQUET")
  rm -rf "$OUT/$cal-measure"
  t0=$(now)
  "$Q" convert -i "$MODEL" -o "$OUT/$cal-measure" --measure-only "${CAL[@]}" "$@" >"$OUT/$cal-measure.log" 2>&1 ||
    { tail -5 "$OUT/$cal-measure.log"; exit 1; }
  tm=$(awk "BEGIN{print $(now) - $t0}")
  echo "measurement ($cal): ${tm}s" >&2
  for b in 2.5 3.0 4.0 5.0 6.0; do
    D="$OUT/$cal-$b"; rm -rf "$D"
    t0=$(now)
    "$Q" convert -i "$MODEL" -o "$D" -b $b --measurement "$OUT/$cal-measure/measurement.json" "${CAL[@]}" "$@" \
      >"$D.log" 2>&1 || { tail -5 "$D.log"; exit 1; }
    tc=$(awk "BEGIN{print $(now) - $t0}")
    "$Q" ppl -q -m "$D" --kld-base "$MODEL" -f "$TEXT" "$@" >"$D.kld" 2>&1 || { tail -3 "$D.kld"; exit 1; }
    g() { awk -v k=$1 '$1==k {print $2}' "$D.kld"; }
    bpw=$(grep -o '"decoder_bpw": [0-9.]*' "$D/quantization_report.json" | awk '{printf "%.4f", $2}')
    size=$(du -cm "$D"/*.safetensors | tail -1 | cut -f1)
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %.0f (+%.0f measuring) |\n" $cal $b $bpw $(g kld) $(g top1) \
      $(g ppl_ratio) $(g ppl) $size $tc $tm
  done
done
