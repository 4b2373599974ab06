"""Cost of zero-shot catalogue scoring: naive per-item, cached prompt, token trie, and exact top-k search.

All methods compute log p(title | prompt) for the same users and prompts (``llmrec.zeroshot``):

- ``naive``: ``prompt + title`` from scratch for every item. Its cost is ~n_items prompts per user, so it
  runs on a seeded random subset of ``--naive_items`` items; its tokens are counted exactly for the full
  catalogue and its times are extrapolated linearly (marked ``*``).
- ``cached``: the prompt once, titles in right-padded batches against its KV cache.
- ``trie``: the prompt once, each inner node of the title token trie once (tree attention).
- ``top-k``: branch and bound over the trie for the exact top-k by total log-likelihood (train+valid
  items excluded, as in the test protocol); only the sum variant, only metrics @K <= k.

Tokens are positions run through the model per user (padding included). Times are per user: wall and CPU
seconds of this process (all threads; steadier than wall time on a shared machine). Speedups are naive's
CPU time (and token count) over each method's. ``max_diff`` is the largest score difference from naive on
the naive subset (cached, trie) or from trie on the items the top-k search reached. Prints a table and
writes JSON (default ``benchmarks/results/zeroshot_scoring.json``).

    python benchmarks/zeroshot_scoring.py --data DIR [--backbone smollm2-135m] [--users 3] \\
        [--naive_items 100] [--top_k 20,100] [--dtype float32] [--threads 1]
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
from llmrec.backbone import load_backbone  # noqa: E402
from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.reporting import machine_info, timed  # noqa: E402
from llmrec.zeroshot import (  # noqa: E402
    PromptConfig,
    ZeroShotScorer,
    score_cached,
    score_naive,
    score_top_k,
    score_trie,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-100k", help="dataset bundle (python -m data_prep build)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    parser.add_argument("--users", type=int, default=3, help="test users, a seeded sample")
    parser.add_argument("--naive_items", type=int, default=100, help="items naive scoring runs on (per user)")
    parser.add_argument(
        "--top_k", default="20,100", help="comma-separated k for the top-k search ('' for none)"
    )
    parser.add_argument("--max_history", type=int, default=20)
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zeroshot_scoring.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = load_bundle(args.data)
    model, tokenizer = load_backbone(args.backbone, dtype=args.dtype)
    scorer = ZeroShotScorer(model, tokenizer, bundle.item_titles, PromptConfig(max_history=args.max_history))
    items, trie = scorer.items, scorer.trie
    rng = np.random.default_rng(args.seed)
    test_users = np.flatnonzero(np.diff(bundle.matrix("test").indptr) > 0)
    users = np.sort(rng.choice(test_users, size=args.users, replace=False))
    subset = np.sort(rng.choice(bundle.n_items, size=min(args.naive_items, bundle.n_items), replace=False))
    histories, exclude = bundle.histories("train"), bundle.seen("test")
    ks = [int(k) for k in args.top_k.split(",") if k.strip()]
    scale = bundle.n_items / len(subset)

    names = ["naive", "cached", "trie", *(f"top-{k}" for k in ks)]
    sums = {name: {"tokens": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "max_diff": 0.0} for name in names}
    prompt_tokens = []
    for user in users:
        prompt = scorer.build_prompt(histories[user])
        prompt_tokens.append(len(prompt))
        wall, cpu, naive = timed(lambda p=prompt: score_naive(model, p, [items[i] for i in subset]))
        sums["naive"]["wall_s"] += wall * scale
        sums["naive"]["cpu_s"] += cpu * scale
        sums["naive"]["tokens"] += sum(len(prompt) + len(t) - 1 for t in items)  # exact, full catalogue
        runs = {
            "cached": lambda p=prompt: score_cached(model, p, items, args.batch_size),
            "trie": lambda p=prompt: score_trie(model, p, trie, args.chunk_size),
        }
        for k in ks:
            runs[f"top-{k}"] = lambda p=prompt, k=k, u=user: score_top_k(
                model, p, trie, k, exclude[u].indices, args.chunk_size
            )
        results = {}
        for name, run in runs.items():
            wall, cpu, results[name] = timed(run)
            sums[name]["wall_s"] += wall
            sums[name]["cpu_s"] += cpu
            sums[name]["tokens"] += results[name].tokens_computed
        for name in ("cached", "trie"):
            diff = (results[name].total[subset] - naive.total).abs().max().item()
            sums[name]["max_diff"] = max(sums[name]["max_diff"], diff)
        for k in ks:
            top = results[f"top-{k}"].total
            reached = torch.isfinite(top)
            diff = (top[reached] - results["trie"].total[reached]).abs().max().item()
            sums[f"top-{k}"]["max_diff"] = max(sums[f"top-{k}"]["max_diff"], diff)
        print(
            f"user {user}: prompt {len(prompt)} tokens, "
            + ", ".join(f"{n} {results[n].tokens_computed}" for n in results)
            + " tokens",
            flush=True,
        )

    n = len(users)
    rows = {}
    for name, s in sums.items():
        row = {key: value / n for key, value in s.items() if key != "max_diff"}
        row["tokens"] = round(row["tokens"])
        row["speedup_tokens"] = sums["naive"]["tokens"] / s["tokens"]
        row["speedup_cpu"] = sums["naive"]["cpu_s"] / s["cpu_s"]
        row["max_diff"] = s["max_diff"] if name != "naive" else None
        rows[name if name != "naive" else "naive*"] = row
    n_title_tokens = sum(len(t) for t in items)
    trie_stats = {
        "items": len(items),
        "title_tokens": n_title_tokens,
        "trie_nodes": len(trie) - 1,
        "inner_nodes": len(trie.inner),
        "mean_prompt_tokens": float(np.mean(prompt_tokens)),
    }
    print(
        f"{args.backbone} ({args.dtype}, {torch.get_num_threads()} threads) on {args.data}: {n} users, "
        f"{bundle.n_items} items; naive* on {len(subset)} items, extrapolated"
    )
    print(
        f"trie: {trie_stats['title_tokens']} title tokens -> {trie_stats['trie_nodes']} nodes, "
        f"{trie_stats['inner_nodes']} inner (run per user); mean prompt {trie_stats['mean_prompt_tokens']:.0f} tokens"
    )
    print(
        format_table(
            {
                name: {**row, "max_diff": "-" if row["max_diff"] is None else f"{row['max_diff']:.1e}"}
                for name, row in rows.items()
            },
            ["tokens", "wall_s", "cpu_s", "speedup_tokens", "speedup_cpu", "max_diff"],
            name="method",
            digits=2,
        )
    )
    write_metrics_json(
        args.out,
        rows,
        config=vars(args),
        users=[int(u) for u in users],
        naive_items=[int(i) for i in subset],
        trie=trie_stats,
        machine=machine_info(),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
