"""Serving latency and throughput of `llmrec.Recommender` beside a bare forward pass of the same LM.

Measures, on one model over a dataset's users:

- known user, cached: ``recommend(user=..., k)`` once the user's item-head input is cached (one head
  product, the prior where the model has one, top-k), over 64 sampled users filled by ``warm_cache``;
- known user, first call: the same call on an empty cache (one forward pass of the user's prompt);
- update: ``update(user, [one item])`` on a cached prompt, split into incremental steps (the new tokens
  run on the prompt's keys and values) and full recomputes (truncation to ``max_doc_tokens`` drops an old
  item, so the prompt's start changes);
- cold history: ``recommend(history=[...])`` with a user's training items as an unseen user's history;
- batches of 1/8/64 users: cold histories and first-call known users (``clear_cache`` before each batch)
  in users/s, and cached known users;
- bare forward: ``model.lm(inputs_embeds=..., attention_mask=..., logits_to_keep=1)`` on exactly the
  same prompt tokens (cold prompts for the latency row, the batch's prompts for the throughput rows),
  with the ID-token embeddings looked up beforehand: the LM with its LoRA, no prompt rendering,
  tokenization, item head or top-k. Its word head (49k words on SmolLM2, last position only) costs
  more than the 1,682-item head, so the decoder alone (``model.decoder``, no head) is timed too, as
  the stricter baseline.

The model is an exported bundle (``--bundle``), or with ``--data`` an untrained `CLLM4Rec.from_config`
(timing depends on the shapes, not the weights). Prints a table and writes JSON (default
``benchmarks/results/serving.json``).

    python benchmarks/serving.py --bundle DIR [--threads 1] [--calls 200] [--repeats 3]
    python benchmarks/serving.py --data data/ml-100k [--backbone smollm2-135m --num_layers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.prompts import prompt_batch  # noqa: E402
from llmrec.recommender import Recommender  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402

BATCHES = (1, 8, 64)


def build_untrained(args: argparse.Namespace) -> Recommender:
    """A Recommender over an untrained model on the dataset bundle ``--data``."""
    from data_prep import load_bundle
    from llmrec.backbone import BackboneConfig
    from llmrec.export import cold_template
    from llmrec.model import CLLM4Rec, ModelConfig

    bundle = load_bundle(args.data)
    model = CLLM4Rec.from_config(
        ModelConfig(max_doc_tokens=args.max_doc_tokens),
        BackboneConfig(args.backbone, num_layers=args.num_layers or None),
        bundle.n_users,
        bundle.n_items,
        seed=args.seed,
    )
    model.to(args.device).eval()
    templates = {"user": bundle.templates.finetune, "cold": cold_template(bundle.templates.finetune)}
    return Recommender(model, bundle.catalogue, bundle.histories("train"), templates)


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "calls": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="exported recommender bundle (recipes/export.py)")
    parser.add_argument("--data", default="data/ml-100k", help="dataset bundle, for an untrained model")
    parser.add_argument("--backbone", default="smollm2-135m", help="untrained model only")
    parser.add_argument("--num_layers", type=int, default=2, help="untrained model only (0: all)")
    parser.add_argument("--max_doc_tokens", type=int, default=128, help="untrained model only")
    parser.add_argument("--k", type=int, default=10, help="list length")
    parser.add_argument("--calls", type=int, default=200, help="cached known-user calls timed")
    parser.add_argument("--forward_calls", type=int, default=30, help="calls timed per LM-bound latency row")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()

    if args.bundle:
        rec = Recommender.from_pretrained(args.bundle, device=args.device)
    else:
        rec = build_untrained(args)
    model, device = rec.model, next(rec.model.parameters()).device
    user_ids, item_ids = rec.catalogue.user_ids, rec.catalogue.item_ids

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clock(fn: Callable[[], Any]) -> float:
        """Milliseconds of one call."""
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return 1000 * (time.perf_counter() - start)

    @torch.no_grad()
    def bare(prompts: list[list[int]], body: bool = False) -> Callable[[], Any]:
        """The bare LM forward of ``prompts`` (right-padded), embeddings looked up beforehand: ``model.lm``
        (its word head on the last position only), or with ``body`` the decoder alone (no head at all)."""
        batch = prompt_batch(prompts, pad_token_id=model.tokenizer.pad_token_id or 0)
        embeds = model.collab(batch["input_ids"].to(device))
        mask = batch["attention_mask"].to(device)
        if body:
            return lambda: model.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return lambda: model.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=False)

    def cold_prompt(user: int) -> list[int]:
        return rec.cold_prompts.encode(user, rec.histories[user])

    def history(user: int) -> list[str]:
        return [item_ids[i] for i in rec.histories[user]]

    sample = rng.choice(rec.n_users, size=max(args.forward_calls, max(BATCHES)), replace=False).tolist()
    rec.recommend(user_ids[sample[0]], k=args.k), bare([cold_prompt(sample[0])])()  # warm-up
    rows: dict[str, dict[str, Any]] = {}

    # known users, first call (empty cache) and cached
    rec.clear_cache()
    rows["known user, first call"] = percentiles(
        [clock(lambda u=u: rec.recommend(user_ids[u], k=args.k)) for u in sample[: args.forward_calls]]
    )
    rec.clear_cache()
    warm_ms = clock(lambda: rec.warm_cache([user_ids[u] for u in sample], batch_size=64))
    picks = rng.choice(sample, size=args.calls).tolist()
    rows["known user, cached"] = percentiles(
        [clock(lambda u=u: rec.recommend(user_ids[u], k=args.k)) for u in picks]
    )
    cache_mb = rec.cache_bytes / 1e6

    # cold histories beside the bare forward of the same prompts
    cold = [
        clock(lambda u=u: rec.recommend(history=history(u), k=args.k)) for u in sample[: args.forward_calls]
    ]
    forward = [clock(bare([cold_prompt(u)])) for u in sample[: args.forward_calls]]
    body = [clock(bare([cold_prompt(u)], body=True)) for u in sample[: args.forward_calls]]
    rows["cold history"] = {
        **percentiles(cold),
        "vs_bare_lm_p50": float(np.median(cold) / np.median(forward)),
        "vs_decoder_p50": float(np.median(cold) / np.median(body)),
    }
    rows["bare model.lm (cold prompts)"] = percentiles(forward)
    rows["bare decoder (cold prompts)"] = percentiles(body)

    # throughput: users per second at batch sizes 1/8/64, median of --repeats
    for size in BATCHES:
        users = sample[:size]
        known_prompts = [rec.prompts.encode(u, rec.histories[u]) for u in users]
        cold_prompts = [cold_prompt(u) for u in users]

        def first_calls(users=users) -> None:
            rec.clear_cache()
            rec.recommend_batch([user_ids[u] for u in users], k=args.k)

        timings = {
            "known, first call": first_calls,
            "known, cached": lambda users=users: rec.recommend_batch([user_ids[u] for u in users], k=args.k),
            "cold": lambda users=users: rec.recommend_batch(histories=[history(u) for u in users], k=args.k),
            "lm (known)": bare(known_prompts),
            "decoder (known)": bare(known_prompts, body=True),
            "lm (cold)": bare(cold_prompts),
            "decoder (cold)": bare(cold_prompts, body=True),
        }
        ms: dict[str, list[float]] = {name: [] for name in timings}
        for _ in range(args.repeats):  # round robin, so that a change of machine load hits every path
            for name, fn in timings.items():
                if name == "known, cached":
                    rec.warm_cache([user_ids[u] for u in users])
                ms[name].append(clock(fn))
        per_s = {name: 1000 * size / statistics.median(values) for name, values in ms.items()}
        rows[f"batch {size}, users/s"] = {
            **per_s,
            "known/lm": per_s["known, first call"] / per_s["lm (known)"],
            "known/decoder": per_s["known, first call"] / per_s["decoder (known)"],
            "cold/lm": per_s["cold"] / per_s["lm (cold)"],
            "cold/decoder": per_s["cold"] / per_s["decoder (cold)"],
        }

    # updates by one unseen item each, on cached prompts (the histories grow: measured last)
    rec.clear_cache()
    steps: dict[bool, list[float]] = {True: [], False: []}
    for u in sample[: args.forward_calls]:
        rec.score(user_ids[u])  # caches the prompt and its keys and values
        new = item_ids[int(rng.choice(np.setdiff1d(np.arange(rec.n_items), rec.histories[u])))]
        start = time.perf_counter()
        reuse = rec.update(user_ids[u], [new])
        sync()
        steps[reuse].append(1000 * (time.perf_counter() - start))
    for reuse, label in ((True, "update +1 item, incremental"), (False, "update +1 item, full recompute")):
        if steps[reuse]:
            rows[label] = percentiles(steps[reuse])

    prompt_tokens = [len(rec.prompts.encode(u, rec.histories[u])) for u in range(rec.n_users)]
    setup = {
        "model": args.bundle
        or f"untrained {args.backbone} ({args.num_layers or 'all'} layers) on {args.data}",
        "backbone": model.backbone.name_or_path,
        "num_layers": model.backbone.num_layers,
        "model_config": {
            key: getattr(model.config, key) for key in ("head", "history_pool", "prior", "max_doc_tokens")
        },
        "users": rec.n_users,
        "items": rec.n_items,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)),
        "k": args.k,
        "warm_cache_s_per_user": warm_ms / 1000 / len(sample),
        "cache_mb": cache_mb,
        "seed": args.seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(),
    }
    print(json.dumps(setup, indent=2))
    latency = {name: row for name, row in rows.items() if "p50_ms" in row}
    columns = ["p50_ms", "p95_ms", "calls", "vs_bare_lm_p50", "vs_decoder_p50"]
    print(format_table(latency, columns, name="latency", digits=2))
    throughput = {name: row for name, row in rows.items() if "p50_ms" not in row}
    print(format_table(throughput, list(next(iter(throughput.values()))), name="throughput", digits=2))
    write_metrics_json(args.out, rows, setup=setup)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
