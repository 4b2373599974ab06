"""The plan past one machine, computed: memory per GPU and time per epoch under DDP and FSDP per user table.

    python benchmarks/scaling_plan.py [--scale benchmarks/results/id_tables_scale.json] [--users 10000000]
        [--items 1000000] [--interactions 1000000000] [--gpus 1 8 32] [--mfu 0.2]
        [--out benchmarks/results/scaling_plan.json]

A model of one finetuning epoch of the sequential item head (every interaction is a token and a labelled
position) with sampled softmax (8,192 shared negatives; the full softmax over 1M items would cost 3.5
GFLOP per position, 7x the LM), from:

- **measured** (``--scale``, `benchmarks/id_tables_scale.py`): the base peak of a step without ID
  tables, and, as a check, the bytes per table element that the CPU peaks fit (printed). The plan itself
  counts 16 bytes per densely updated element (weight, gradient, two Adam moments, fp32) and 12 per
  sparsely updated one: on CPU, Linux commits the pages of a zero-filled tensor only when written, so a
  dense embedding gradient that only the batch's rows touch, or the moments of rows never updated, do
  not show in RSS (the fit gives less); a GPU allocator commits them all;
- **counted**: the trainable elements of each option at ``--users`` x ``--items``, both views, and the
  FLOPs per token of SmolLM2-135M (30 layers, 576 wide; a frozen backbone with LoRA does the forward and
  the activation half of the backward, 4 x non-embedding parameters per token, plus attention);
- **assumed** (flags, to be replaced by `benchmarks/gpu_check.sh` numbers): the GPU's bf16 peak and the
  fraction reached (``--mfu``), and the all-reduce bandwidth (``--bus_gbs``).

DDP keeps every table on every GPU and all-reduces dense gradients each step (sparse user gradients
travel as their touched rows); FSDP shards gradients and Adam state over the GPUs, but the ID tables
live in the root unit of ``recipes/accelerate/fsdp.yaml`` (transformer-layer wrapping), so each forward
all-gathers them whole: their fp32 weights count in full on every GPU. Sparse gradients are not
supported there, so the user tables pay the dense cost. Prints a Markdown table
for docs/scaling.md and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, FFN, KV_HEADS, HEADS = 576, 30, 1536, 3, 9  # SmolLM2-135M
NEGATIVES = 8192
BACKBONE_BYTES = 135e6 * 2  # the frozen backbone in bf16
TABLES = {  # option -> (per-view user elements as a function of users, sparse gradients)
    "full": (lambda users: users * HIDDEN, False),
    "full, sparse updates": (lambda users: users * HIDDEN, True),
    "lowrank 32, sparse updates": (lambda users: users * 32 + 32 * HIDDEN, True),
    "hashed 2 x 1M buckets, sparse updates": (lambda users: 2**20 * HIDDEN, True),
    "none": (lambda users: HIDDEN, False),
}


def lm_flops_per_token(seq: int) -> float:
    """Forward + activation backward of the frozen decoder (LoRA's own FLOPs are negligible at r 16)."""
    attention_proj = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS * KV_HEADS)
    per_layer = attention_proj + 3 * HIDDEN * FFN
    matmuls = 2 * LAYERS * per_layer  # forward
    attention = 2 * 2 * LAYERS * seq * HIDDEN / 2  # causal QK^T and AV, half the square on average
    return 2 * (matmuls + attention)  # the backward's activation gradients cost about the forward


def head_flops_per_position(candidates: int) -> float:
    return 3 * 2 * HIDDEN * candidates  # logits, their gradient to the hidden state and to the rows


def element_bytes(scale: dict, sparse: bool) -> tuple[float, float]:
    """(bytes per user-table element, base MB): a line through the measured (elements, peak RSS) points of
    the scale benchmark whose rows update densely (or sparsely)."""
    rows = [
        r
        for r in scale["rows"]
        if r["measured"] and bool(scale["options"][r["option"]].get("sparse_updates")) == sparse
    ]
    per = 12 if sparse else 16  # what id_tables_scale.py's user_table_mb assumed per element
    elements = np.array([r["user_table_mb"] * 2**20 / per for r in rows])  # both views
    peak = np.array([r["peak_rss_mb"] * 2**20 for r in rows])
    slope, intercept = np.polyfit(elements, peak, 1)
    return float(slope), float(intercept / 2**20)


def plan(args: argparse.Namespace, per_element: float, sparse_element: float, base_mb: float) -> list[dict]:
    tokens = args.interactions * args.tokens_per_interaction
    flops = tokens * lm_flops_per_token(args.seq) + args.interactions * head_flops_per_position(NEGATIVES)
    item_elements = 2 * args.items * HIDDEN  # collaborative (tied head) + content item tables
    rows = []
    for name, (user_elements, sparse) in TABLES.items():
        users = 2 * user_elements(args.users)
        for gpus in args.gpus:
            steps = tokens / (gpus * args.tokens_per_gpu_step)
            compute_s = flops / (gpus * args.peak_tflops * 1e12 * args.mfu)
            for strategy in ("DDP", "FSDP"):
                if strategy == "DDP":
                    table_bytes = item_elements * per_element + users * (
                        sparse_element if sparse else per_element
                    )
                    dense = 4 * (item_elements + (0 if sparse else users))  # fp32 gradients all-reduced
                    wire = 2 * (gpus - 1) / gpus * dense
                else:
                    # the tables sit in the root FSDP unit: all-gathered whole (4 B/element) at each
                    # forward; gradients and Adam state stay sharded
                    elements = item_elements + users
                    table_bytes = elements * 4 + elements * (per_element - 4) / gpus
                    dense = 4 * (item_elements + users)
                    wire = 3 * (gpus - 1) / gpus * dense / 2  # all-gather params (bf16) + reduce-scatter
                comm_s = steps * wire / (args.bus_gbs * 1e9) if gpus > 1 else 0.0
                rows.append(
                    {
                        "option": name,
                        "gpus": gpus,
                        "strategy": strategy,
                        "memory_gb": (
                            table_bytes + BACKBONE_BYTES + (base_mb + args.activation_gb * 1024) * 2**20
                        )
                        / 2**30,
                        "compute_h": compute_s / 3600,
                        "comm_h": comm_s / 3600,
                        "epoch_h": (compute_s + comm_s) / 3600,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="benchmarks/results/id_tables_scale.json")
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=float, default=1e9)
    parser.add_argument("--tokens_per_interaction", type=float, default=1.1, help="item token + prompt words")
    parser.add_argument("--seq", type=int, default=512, help="tokens per window")
    parser.add_argument("--tokens_per_gpu_step", type=int, default=16 * 512)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.2, help="fraction of the peak reached (assumed)")
    parser.add_argument(
        "--bus_gbs", type=float, default=100.0, help="all-reduce bus bandwidth, GB/s (assumed)"
    )
    parser.add_argument("--activation_gb", type=float, default=6.0, help="activations of one step (assumed)")
    parser.add_argument("--out", default="benchmarks/results/scaling_plan.json")
    args = parser.parse_args(argv)
    scale = json.loads(Path(args.scale).read_text())
    fit_dense, intercept_mb = element_bytes(scale, sparse=False)
    fit_sparse, _ = element_bytes(scale, sparse=True)
    measured_items = {r["items"] for r in scale["rows"]}.pop()
    # the intercept still holds the measured catalogue's item tables; the plan adds its own
    base_mb = intercept_mb - 2 * measured_items * HIDDEN * fit_dense / 2**20
    rows = plan(args, 16.0, 12.0, base_mb)
    print(
        f"CPU fit: {fit_dense:.1f} bytes per table element updated densely, {fit_sparse:.1f} sparsely "
        f"(counted for GPUs: 16 / 12); base without ID tables {base_mb:,.0f} MB; "
        f"LM {lm_flops_per_token(args.seq) / 1e9:.2f} GFLOP/token, head {head_flops_per_position(NEGATIVES) / 1e6:.0f} "
        f"MFLOP/position"
    )
    print("| user table | GPUs | DDP GB/GPU | DDP h/epoch | FSDP GB/GPU | FSDP h/epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i in range(0, len(rows), 2):
        ddp, fsdp = rows[i], rows[i + 1]
        print(
            f"| {ddp['option']} | {ddp['gpus']} | {ddp['memory_gb']:,.1f} | {ddp['epoch_h']:.2f} "
            f"| {fsdp['memory_gb']:,.1f} | {fsdp['epoch_h']:.2f} |"
        )
    record = {
        "args": vars(args),
        "cpu_fit_bytes_per_element": fit_dense,
        "cpu_fit_bytes_per_sparse_element": fit_sparse,
        "bytes_per_element": 16,
        "bytes_per_sparse_element": 12,
        "base_mb": base_mb,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
