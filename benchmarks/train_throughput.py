"""Pretraining-step throughput: llmrec's training loop beside a bare PyTorch loop on the same model and batch.

    python benchmarks/train_throughput.py [--backbone smollm2-135m] [--layers 30,4] [--steps 6]

For each depth, the same LoRA-wrapped backbone trains on the same collaborative batch of ML-100K
(every row cut to ``--doc_tokens`` tokens, so no padding): (a) through ``llmrec.train.train`` (accelerate,
ID-token embeddings, item-only softmax, global-count loss normalisation, logging) and (b) in a bare loop
``loss = lm(input_ids, labels=input_ids).loss; loss.backward(); opt.step()`` over the same token count,
with the ID tokens replaced by word ids (the bare loop scores the whole 49k-word vocabulary, llmrec only
the 1,682 items). Tokens/s are medians over the steps after the first; the ratio llmrec / bare shows the
framework's overhead (below 1) or its savings (above 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.log import setup_logging
from data_prep import load_bundle
from data_prep.build import build_ml100k_reference
from llmrec.backbone import BackboneConfig
from llmrec.collate import PretrainDataset
from llmrec.metrics import format_table
from llmrec.model import ModelConfig
from llmrec.pipeline import model_for
from llmrec.reporting import machine_info, write_report
from llmrec.train import TrainConfig, make_accelerator, train

REPO = Path(__file__).resolve().parents[1]


def fixed_rows(bundle, doc_tokens: int, batch_size: int) -> list[dict]:
    """The first users whose collaborative documents fill ``doc_tokens`` (so every batch has no padding)."""
    rows = [row for row in bundle.corpus("collaborative") if row["main"].count("<item_") >= doc_tokens]
    return rows[:batch_size]


def llmrec_tokens_per_s(
    bundle, rows, backbone: BackboneConfig, doc_tokens: int, steps: int, seed: int
) -> float:
    model = model_for(bundle, ModelConfig(max_doc_tokens=doc_tokens, mutual_reg=0.0), backbone, seed=seed)
    dataset = PretrainDataset(rows, model.vocab, model.tokenizer, seed=seed, max_tokens=doc_tokens)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, max_steps=steps, batch_size=len(rows), log_steps=1, seed=seed)
        train(model, dataset, config, make_accelerator(config))
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[1:])


def bare_tokens_per_s(
    bundle, rows, backbone: BackboneConfig, doc_tokens: int, steps: int, seed: int
) -> float:
    model = model_for(bundle, ModelConfig(max_doc_tokens=doc_tokens), backbone, seed=seed)
    lm = model.lm  # the same LoRA-wrapped backbone, driven directly
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.vocab.base_size, (len(rows), doc_tokens), generator=generator)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    lm.train()
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = lm(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rates.append(input_ids.numel() / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--layers", default="30,4", help="comma-separated decoder depths to measure")
    parser.add_argument("--data", default=str(REPO / "data" / "ml-100k"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--doc_tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()
    setup_logging()
    build_ml100k_reference(Path(args.shared), Path(args.data), exist_ok=True)
    bundle = load_bundle(args.data)
    rows = fixed_rows(bundle, args.doc_tokens, args.batch_size)
    table = {}
    for depth in (int(n) for n in args.layers.split(",")):
        backbone = BackboneConfig(args.backbone, num_layers=depth)
        ours = llmrec_tokens_per_s(bundle, rows, backbone, args.doc_tokens, args.steps, args.seed)
        bare = bare_tokens_per_s(bundle, rows, backbone, args.doc_tokens, args.steps, args.seed)
        table[f"{args.backbone} ({depth} layers)"] = {
            "llmrec_tok_s": ours,
            "bare_tok_s": bare,
            "ratio": ours / bare,
        }
    print(format_table(table, ["llmrec_tok_s", "bare_tok_s", "ratio"], name="pretraining step", digits=2))
    write_report(args.out, {"config": vars(args), "results": table, "machine": machine_info()})


if __name__ == "__main__":
    main()
