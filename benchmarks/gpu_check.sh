#!/usr/bin/env bash
# GPU check: the GPU recipe (recipes/configs/ml-100k.yaml: all 30 layers of SmolLM2-135M, LoRA on every
# linear layer, bf16) for a fixed number of steps of pretraining and of finetuning through
# `accelerate launch`, finetuning's validation pass and a test evaluation; prints tokens/s, the fraction
# of the GPU's peak dense bf16 FLOP/s reached and peak GPU memory, and writes JSON
# (benchmarks/gpu_check.py says how each number is measured).
#
#   benchmarks/gpu_check.sh [--steps 200] [--out benchmarks/results/gpu_check.json]   # one GPU
#   benchmarks/gpu_check.sh --smoke [--out FILE]   # the same path on CPU with a tiny random model, < 60 s
#
# The GPU run builds data/ml-100k from the shared MovieLens-100K files first if it is missing
# (LLMREC_SHARED, default ../shared). PYTHON picks the interpreter (default: python); GPU_CHECK_WORK the
# directory for the runs (default: a fresh temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
steps=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --steps) steps=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --smoke, --steps N, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python}
work=${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1

if [ "$smoke" = 1 ]; then
  steps=${steps:-4}
  out=${out:-$work/gpu_check.json}
  data=$work/bundle
  # a small synthetic log with item titles: 40 users, 30 items
  "$python" - "$work/log" <<'EOF'
import sys
from pathlib import Path

import numpy as np

d = Path(sys.argv[1])
d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = [f"u{u}\ti{i}\t{t}" for u in range(40) for t, i in enumerate(rng.choice(30, size=8, replace=False))]
(d / "log.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
titles = [f"i{i}\tFilm number {i}" for i in range(30)]
(d / "log.item").write_text("item_id:token\ttitle:token_seq\n" + "\n".join(titles) + "\n")
EOF
  "$python" -m data_prep build --format recbole --input "$work/log" --out "$data" --split loo --overwrite true
  launch=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
  overrides=(--name_or_path tiny-llama --lora_r 4 --max_doc_tokens 32 --batch_size 8 --mixed_precision no)
else
  steps=${steps:-200}
  out=${out:-benchmarks/results/gpu_check.json}
  data=data/ml-100k
  if [ ! -f "$data/manifest.json" ]; then
    "$python" -c "import sys; from data_prep.build import build_ml100k_reference as b; b(sys.argv[1], sys.argv[2])" \
      "${LLMREC_SHARED:-../shared}" "$data"
  fi
  launch=(--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  overrides=()
fi

"$python" -m accelerate.commands.launch "${launch[@]}" benchmarks/gpu_check.py \
  --data "$data" --work "$work/runs" --steps "$steps" --out "$out" -- "${overrides[@]}"
