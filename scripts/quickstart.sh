#!/usr/bin/env bash
# Sets up, builds and runs qforge end to end on a model that needs no download: by default the
# trained test Llama in ../shared/data (override with MODEL=/path/to/hf-model-folder): inspect,
# convert to EXL2 at 4.0 bpw (self-sampled calibration, so no dataset either; a small one here to
# keep it to a few minutes on a laptop CPU), then generate with the result and compare it with the
# original (perplexity, KL divergence, top-1 agreement).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-../shared/data/models/testmodel-llama-20m}
scripts/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target qforge
if [ ! -d "$MODEL" ]; then
  echo "no model at $MODEL: set MODEL to a Hugging Face Llama/Mistral/Qwen2 folder" >&2
  exit 1
fi
echo "== qforge inspect -m $MODEL --no-layers"
build/qforge inspect -m "$MODEL" --no-layers
QUANT=build/quickstart-exl2-4.0
rm -rf "$QUANT"
echo; echo "== qforge convert -i $MODEL -o $QUANT -b 4.0 --rows 32 --length 256 --measure-tokens 4096"
build/qforge convert -i "$MODEL" -o "$QUANT" -b 4.0 --rows 32 --length 256 --measure-tokens 4096
echo; echo "== qforge generate -m $QUANT -p 'Once upon a time' -n 64 --temperature 0"
build/qforge generate -m "$QUANT" -p "Once upon a time" -n 64 --temperature 0
TEXT=../shared/data/text/heldout/heldout.txt
if [ -f "$TEXT" ]; then
  echo; echo "== qforge ppl -m $QUANT --kld-base $MODEL -f $TEXT --max-windows 20 --kld-windows 8"
  build/qforge ppl -q -m "$QUANT" --kld-base "$MODEL" -f "$TEXT" --max-windows 20 --kld-windows 8
fi
