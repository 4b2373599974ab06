"""The GPU check's measured part, run under ``accelerate launch`` by ``benchmarks/gpu_check.sh``.

One process runs the GPU recipe's three stages for a fixed number of steps: pretraining and finetuning
(``recipes/pretrain.py``, ``recipes/finetune.py``; finetuning ends with its validation pass) and the
test evaluation (``recipes/evaluate.py``), then reports:

- training tokens/s: the mean of the ``tokens_per_s`` windows of ``metrics.jsonl`` after the first
  window (which holds compilation and warm-up), per stage;
- the fraction of the GPU's peak dense bf16 FLOP/s reached, taking a training token as 6·N FLOPs with N
  the language model's parameters outside the input embeddings (the usual model-FLOPs convention; the
  ID-token tables are lookups and the item head is left out; LoRA on a
  frozen backbone skips the weight gradients, so the real work is nearer 4·N: the fraction is an upper
  bound on how busy the GPU was, comparable between runs);
- peak GPU memory (``torch.cuda.max_memory_allocated``) and each stage's wall time.

Peak FLOP/s by ``torch.cuda.get_device_name`` (NVIDIA data sheets, dense bf16 tensor cores): H100/H200
SXM 989.4 TFLOP/s, H100 NVL 835.5, H100 PCIe 756.5, A100 312. On CPU (``--smoke``) the fraction and
the GPU memory are null.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))  # the recipes, imported by name (recipe())
PEAK_BF16 = (("H200", 989.4e12), ("H100 NVL", 835.5e12), ("H100 PCIe", 756.5e12), ("H100", 989.4e12))
PEAK_BF16_OTHER = (("A100", 312e12),)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (the most specific match first); None when unknown."""
    for key, flops in (*PEAK_BF16, *PEAK_BF16_OTHER):
        if key.lower() in device_name.lower():
            return flops
    return None


def recipe(name: str):
    """``main`` of ``recipes/NAME.py``, imported from the recipes folder as the other benchmarks do."""
    return importlib.import_module(name).main


def counting_parameters() -> dict[str, int]:
    """Wrap ``llmrec.train.train`` (which the recipes import when they run) to record the parameters of
    the language model it trains (LoRA included), less the input embeddings (a lookup, not a matmul)."""
    import llmrec.train

    seen: dict[str, int] = {}
    original = llmrec.train.train

    def train(model, *args, **kwargs):
        embeddings = model.lm.get_input_embeddings().weight.numel()
        seen["parameters"] = sum(p.numel() for p in model.lm.parameters()) - embeddings
        return original(model, *args, **kwargs)

    llmrec.train.train = train
    return seen


def tokens_per_s(run: Path) -> float | None:
    """Mean tokens/s of the training log windows after the first (all of them when there is one)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
    return statistics.fmean(rates[1:] or rates) if rates else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "ml-100k.yaml"))
    parser.add_argument("--data", required=True, help="dataset bundle")
    parser.add_argument("--work", required=True, help="directory for the runs (replaced)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each training stage")
    parser.add_argument("--out", required=True, help="JSON result")
    parser.add_argument("overrides", nargs="*", help="more recipe flags (--smoke: a tiny model on CPU)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    common = ["--config", args.config, "--data", args.data, "--log_steps", str(max(1, args.steps // 10))]
    common += args.overrides
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seen = counting_parameters()
    stages: dict[str, dict] = {}
    for stage, extra in (
        ("pretrain", []),
        ("finetune", ["--init", str(work / "pretrain"), "--patience", "0"]),
    ):
        started = time.perf_counter()
        recipe(stage)(
            [*common, *extra, "--output_dir", str(work / stage), "--max_steps", str(args.steps)]
            + ["--overwrite_output_dir", "true", "--save_steps", "0"]
        )
        seconds = time.perf_counter() - started
        stages[stage] = {"seconds": round(seconds, 1), "tokens_per_s": tokens_per_s(work / stage)}
    started = time.perf_counter()
    metrics = recipe("evaluate")(
        ["--config", args.config, "--data", args.data, "--run", str(work / "finetune"), "--split", "test"]
    )
    stages["evaluate"] = {"seconds": round(time.perf_counter() - started, 1)}
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    peak = peak_flops(device) if on_gpu else None
    for stage in ("pretrain", "finetune"):
        rate = stages[stage]["tokens_per_s"]
        flops = 6 * seen.get("parameters", 0) * rate if rate else None
        stages[stage]["model_flops_per_s"] = flops
        stages[stage]["fraction_of_peak"] = round(flops / peak, 4) if flops and peak else None
    result = {
        "device": device,
        "peak_bf16_flops": peak,
        "config": args.config,
        "steps": args.steps,
        "overrides": args.overrides,
        "parameters_without_input_embeddings": seen.get("parameters"),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None,
        "stages": stages,
        "test_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"GPU check on {device} ({args.steps} steps per training stage)")
    for stage, values in stages.items():
        line = f"  {stage:9} {values['seconds']:7.1f} s"
        if values.get("tokens_per_s"):
            line += f"  {values['tokens_per_s']:10,.0f} tokens/s"
            fraction = values["fraction_of_peak"]
            line += f"  {fraction:.1%} of peak bf16 FLOP/s" if fraction is not None else "  (no known peak)"
        print(line)
    memory = result["peak_gpu_memory_mb"]
    print(f"  peak GPU memory: {memory:,} MB" if memory is not None else "  peak GPU memory: n/a (CPU)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
