"""Time to top-20 lists for every user: multinomial item head vs constrained beam search of semantic IDs.

CLLM4Rec argues for its item head on efficiency: one forward pass per user scores the whole catalogue,
where generative recommenders decode an item ID token by token with a beam. This measures that on one
model: the same backbone, LoRA, prompts (all training items) and users, with (a) `ItemHeadScorer` + top-K
of the head's scores (training items masked) and (b) `GenerativeScorer` (beam search constrained by the
index's prefix trie, training items kept out of the search). Weights are untrained: the timing does not
depend on them, nor on the quality of the index, only on its shape (levels, codebook sizes).

Both paths see the same users per batch (``--batch_size``); beam search then runs, per level, every
beam's code prefix against the batch's cached prompts (see `llmrec.generate.ModelDecoder`). Each repeat times (a) and (b) back to back, alternating which goes first; the table shows
the median wall and CPU time (this process, all threads: steadier than wall time on a shared machine)
and the ratios (b) / (a). Prints a table and writes JSON (default
``benchmarks/results/generation_vs_head.json``).

    python benchmarks/generation_vs_head.py --data DIR [--index DIR | --indexer random] \\
        [--backbone smollm2-135m --num_layers 2] [--beam 20] [--top_k 20] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import load_bundle  # noqa: E402
from llmrec.backbone import BackboneConfig  # noqa: E402
from llmrec.generate import GenerativeScorer  # noqa: E402
from llmrec.indexing import IndexData, ItemIndex, make_indexer  # noqa: E402
from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.model import CLLM4Rec, ModelConfig  # noqa: E402
from llmrec.pipeline import prompts_for  # noqa: E402
from llmrec.reporting import machine_info, timed  # noqa: E402
from llmrec.scoring import ItemHeadScorer  # noqa: E402


def head_top_k(scorer: ItemHeadScorer, train, users: np.ndarray, top_k: int, batch_size: int) -> torch.Tensor:
    """(a): one forward per user (batched), training items masked, ``torch.topk``."""
    lists = []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        scores = scorer.score(chunk)
        scores[torch.from_numpy(train[chunk].toarray() > 0)] = float("-inf")
        lists.append(scores.topk(top_k, dim=1).indices)
    return torch.cat(lists)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k", help="dataset bundle (python -m data_prep build)")
    parser.add_argument("--index", default=None, help="saved ItemIndex (recipes/index.py); else --indexer")
    parser.add_argument("--indexer", default="random", help="random | sequential, built here without --index")
    parser.add_argument(
        "--codebook_size", type=int, default=12, help="--indexer codes per level (12: 3 levels)"
    )
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--num_layers", type=int, default=2, help="keep the first N decoder layers (0: all)")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--max_doc_tokens", type=int, default=512, help="longest prompt")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32, help="users per forward pass, both paths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_vs_head.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    bundle = load_bundle(args.data)
    if args.index:
        index = ItemIndex.load(args.index)
    else:
        data = IndexData(n_items=bundle.n_items, interactions=bundle.interactions("train"))
        index = make_indexer(args.indexer, codebook_size=args.codebook_size, seed=args.seed).build(data)
    model = CLLM4Rec.from_config(
        ModelConfig(lora_r=args.lora_r, max_doc_tokens=args.max_doc_tokens),
        BackboneConfig(args.backbone, num_layers=args.num_layers or None),
        bundle.n_users,
        bundle.n_items,
        seed=args.seed,
        item_index=index,
    )
    model.to(args.device).eval()
    train = bundle.matrix("train")
    users = np.arange(bundle.n_users)
    prompts, histories = prompts_for(bundle, model), bundle.histories("train")
    head = ItemHeadScorer(model, prompts, histories, batch_size=args.batch_size)
    beam = GenerativeScorer(model, prompts, histories, train, beam=args.beam, batch_size=args.batch_size)

    def run_head():
        return head_top_k(head, train, users, args.top_k, args.batch_size)

    def run_beam():
        return beam.recommend(users, args.top_k)[0]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    warm = users[: args.batch_size]
    head_top_k(head, train, warm, args.top_k, args.batch_size), beam.recommend(warm, args.top_k)
    times: dict[str, list[float]] = {"head": [], "beam": [], "head_cpu": [], "beam_cpu": []}
    for repeat in range(args.repeats):
        order = ("head", "beam") if repeat % 2 == 0 else ("beam", "head")
        for name in order:
            sync()
            seconds, cpu, lists = timed(run_head if name == "head" else run_beam)
            sync()
            times[name].append(seconds)
            times[f"{name}_cpu"].append(cpu)
            seen = int(sum(np.isin(lists[u].numpy(), train[u].indices).sum() for u in users))
            short = int((lists < 0).any(1).sum())
            if lists.shape != (len(users), args.top_k) or seen or short:
                raise RuntimeError(f"{name}: {short} short lists, {seen} training items recommended")
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = {
        label: {
            "seconds": median[name],
            "ms_per_user": 1000 * median[name] / len(users),
            "relative": median[name] / median["head"],
            "cpu_seconds": median[f"{name}_cpu"],
            "cpu_relative": median[f"{name}_cpu"] / median["head_cpu"],
        }
        for label, name in (("(a) item head + top-k", "head"), (f"(b) beam search, beam {args.beam}", "beam"))
    }
    prompt_tokens = [len(prompts.encode(int(u), histories[int(u)])) for u in users]
    setup = {
        "data": str(args.data),
        "users": len(users),
        "items": bundle.n_items,
        "index": args.index or f"{args.indexer} (codebook {args.codebook_size}, seed {args.seed})",
        "index_shape": {"levels": index.max_len, "codebook_sizes": list(index.codebook_sizes)},
        "backbone": args.backbone,
        "num_layers": args.num_layers or "all",
        "lora_r": args.lora_r,
        "max_doc_tokens": args.max_doc_tokens,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)),
        "beam": args.beam,
        "top_k": args.top_k,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seed": args.seed,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
    print(json.dumps(setup, indent=2))
    columns = ["seconds", "ms_per_user", "relative", "cpu_seconds", "cpu_relative"]
    print(format_table(rows, columns, name=f"top-{args.top_k}, all users"))
    write_metrics_json(args.out, {**rows, "times": times}, setup=setup)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
