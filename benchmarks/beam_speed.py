"""Constrained beam search: llmrec's batched decoder against ``transformers`` ``generate``, same lists.

The same model, prompts, users and trie (seen items excluded) through (a) `GenerativeScorer`: the prompt
runs once per batch of users and every level runs all beams' code prefixes against its shared KV cache,
the trie walked as tensors (`llmrec.generate.constrained_beam_search`), and (b)
`llmrec.generate.generate_reference`: ``generate(num_beams=B, num_return_sequences=B,
prefix_allowed_tokens_fn=...)`` with the trie walked per beam in Python (HF copies the prompt's cache per
beam). Both see ``--batch_size`` users per call. Reports users/s (wall and CPU time of this process), the
share of users whose top-B lists are identical (order included), the largest score difference, and the
invalid / duplicate / seen items of (a). Weights: the model of ``--run`` (its ``best`` or ``model``), or
a fresh one on ``--index`` (timing and list equality do not depend on training).

    python benchmarks/beam_speed.py --data data/ml-100k-loo [--run RUN | --index DIR] \\
        [--users 64] [--beams 20,50] [--batch_size 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import load_bundle  # noqa: E402
from llmrec.backbone import BackboneConfig  # noqa: E402
from llmrec.generate import generate_reference  # noqa: E402
from llmrec.indexing import ItemIndex  # noqa: E402
from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.model import CLLM4Rec, ModelConfig  # noqa: E402
from llmrec.pipeline import FINETUNE_TASKS, generative_scorer, input_histories  # noqa: E402
from llmrec.reporting import machine_info, timed  # noqa: E402
from llmrec.run import run_model, run_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k-loo")
    parser.add_argument("--run", default=None, help="finetuning run whose model decodes")
    parser.add_argument("--index", default="data/ml-100k-loo/index/rqvae", help="without --run: the index")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--max_doc_tokens", type=int, default=128)
    parser.add_argument("--users", type=int, default=64, help="the first N users with a validation item")
    parser.add_argument("--beams", default="20,50")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "beam_speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = load_bundle(args.data)
    if args.run:
        model, prompt = run_model(args.run), FINETUNE_TASKS[run_task(args.run)]
    else:
        config = ModelConfig(lora_r=8, max_doc_tokens=args.max_doc_tokens)
        backbone = BackboneConfig(args.backbone, num_layers=args.num_layers)
        index = ItemIndex.load(args.index)
        model = CLLM4Rec.from_config(config, backbone, bundle.n_users, bundle.n_items, item_index=index)
        prompt = "semantic_sequence"
    model.eval()
    users = np.flatnonzero(np.diff(bundle.matrix("valid").indptr) > 0)[: args.users]
    seen, histories = bundle.seen("valid"), input_histories(bundle, "valid")
    rows, details = {}, {}
    for beam in [int(b) for b in args.beams.split(",")]:
        scorer = generative_scorer(bundle, model, "valid", beam, args.batch_size, prompt)
        ours_s, ours_cpu, (items, scores) = timed(lambda: scorer.recommend(users))  # noqa: B023

        def reference(beam=beam, scorer=scorer):
            found = []
            for start in range(0, len(users), args.batch_size):
                chunk = users[start : start + args.batch_size]
                prompts = [scorer.prompts.encode(int(u), histories[u]) for u in chunk]
                found.append(generate_reference(model, prompts, beam, [seen[u].indices for u in chunk]))
            return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

        ref_s, ref_cpu, (ref_items, ref_scores) = timed(reference)
        lists = items.numpy()
        same = (items == ref_items).all(dim=1)
        rows[f"beam {beam}"] = {
            "llmrec users/s": len(users) / ours_s,
            "generate users/s": len(users) / ref_s,
            "speed-up (wall)": ref_s / ours_s,
            "speed-up (CPU)": ref_cpu / ours_cpu,
            "identical lists": float(same.float().mean()),
            "max |score diff|": float((scores - ref_scores).abs().max()),
            "invalid": int((lists < 0).sum()),
            "duplicates": int(sum(len(set(row)) < len(row) for row in lists)),
            "seen": int(sum(np.isin(lists[i], seen[u].indices).sum() for i, u in enumerate(users))),
        }
        details[beam] = {
            "llmrec_s": ours_s,
            "generate_s": ref_s,
            "llmrec_cpu_s": ours_cpu,
            "generate_cpu_s": ref_cpu,
        }
    print(format_table(rows, list(next(iter(rows.values())))))
    setup = {
        "data": args.data,
        "run": args.run,
        "index": None if args.run else args.index,
        "users": len(users),
    }
    setup |= {"batch_size": args.batch_size, "levels": model.item_index.max_len}
    write_metrics_json(args.out, rows, setup=setup, seconds=details, machine=machine_info())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
