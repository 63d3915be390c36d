#!/usr/bin/env bash
# Sets up, builds and runs qforge end to end on a model that needs no download: by default the
# trained test Llama in ../shared/data (override with MODEL=/path/to/hf-model-folder).
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
echo; echo "== qforge generate -m $MODEL -p 'Once upon a time' -n 64 --temperature 0"
build/qforge generate -m "$MODEL" -p "Once upon a time" -n 64 --temperature 0
TEXT=../shared/data/text/heldout/heldout.txt
if [ -f "$TEXT" ]; then
  echo; echo "== qforge ppl -m $MODEL -f $TEXT --ctx 512 --max-windows 20"
  build/qforge ppl -m "$MODEL" -f "$TEXT" --ctx 512 --max-windows 20
fi
