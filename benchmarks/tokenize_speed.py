"""Prompt encoding with a 1,000,000-item vocabulary: RecVocab's placeholder split vs tokenizer.add_tokens.

    python benchmarks/tokenize_speed.py [--tokenizer smollm2-135m] [--n_prompts 10000] [--n_items 1000000]
                                        [--naive_limit_s 600] [--seed 0] [--out FILE.json]

Prompts follow the finetune template (``<user_u> has interacted with <item_a> ..., <user_u> will
interact with``) with ``--history`` random items each. The fast path is ``RecVocab.encode`` (one
call per prompt, as a collator does) and ``RecVocab.encode_batch``. The naive path copies the
tokenizer, adds every user and item placeholder with ``add_tokens`` (lstrip added tokens, the
same whitespace rule) and encodes the same prompts; it runs in a child process under
``--naive_limit_s`` and whatever did not finish is reported as such. Both paths must give the same
ids (checked on the first 200 prompts). Prints a table and writes JSON (default
benchmarks/results/tokenize_speed.json) with machine, config and seed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_lib
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHECK = 200


def load_tokenizer(spec: str):
    """``smollm2-135m`` (the converted cache if present, else straight from the GGUF) or a local dir."""
    from transformers import AutoTokenizer

    if spec != "smollm2-135m":
        return AutoTokenizer.from_pretrained(spec)
    from llmrec.backbone import gguf_cache_path, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    cached = gguf_cache_path(gguf, None, "smollm2-135m")
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def make_prompts(n: int, n_users: int, n_items: int, history: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    users = rng.integers(n_users, size=n)
    items = rng.integers(n_items, size=(n, history))
    return [
        f"<user_{u}> has interacted with {' '.join(f'<item_{i}>' for i in row)}, <user_{u}> will interact with"
        for u, row in zip(users, items, strict=True)
    ]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_child(args: dict[str, Any], prompts: list[str], queue: mp.Queue) -> None:
    """Runs in a child process: add every placeholder to the tokenizer, then encode; reports per phase."""
    from transformers import AddedToken

    from llmrec.tokens import RecVocab

    tokenizer = load_tokenizer(args["tokenizer"])
    vocab = RecVocab(len(tokenizer), args["n_users"], args["n_items"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    tokenizer.add_tokens([AddedToken(p, lstrip=True, normalized=False) for p in vocab.placeholders()])
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(("add_tokens_s", time.perf_counter() - start))
    queue.put(("added_tokens_rss_mib", (rss1 - rss0) / 1024))
    deadline = args["deadline"]
    ids = []
    start = time.perf_counter()
    for prompt in prompts:
        ids.append(tokenizer.encode(prompt, add_special_tokens=False))
        if len(ids) == CHECK:
            queue.put(("check_ids", ids[:CHECK]))
        if time.monotonic() > deadline:
            break
    queue.put(("per_prompt", (len(ids), time.perf_counter() - start)))
    start = time.perf_counter()
    tokenizer(prompts, add_special_tokens=False, return_attention_mask=False)
    queue.put(("batch_s", time.perf_counter() - start))


def run_naive(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    settings = {
        "tokenizer": args.tokenizer,
        "n_users": args.n_users,
        "n_items": args.n_items,
        "deadline": time.monotonic() + args.naive_limit_s,
    }
    proc = ctx.Process(target=naive_child, args=(settings, prompts, queue))
    start = time.monotonic()
    proc.start()
    results: dict[str, Any] = {}
    while time.monotonic() - start < args.naive_limit_s + 60 and (proc.is_alive() or not queue.empty()):
        try:
            key, value = queue.get(timeout=1)
            results[key] = value
        except queue_lib.Empty:
            continue
        if key == "batch_s":
            break
    if proc.is_alive():
        proc.terminate()
    proc.join()
    results["finished"] = "batch_s" in results
    return results


def main() -> None:
    from llmrec.reporting import machine_info, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--n_prompts", type=int, default=10_000)
    parser.add_argument("--n_users", type=int, default=100_000)
    parser.add_argument("--n_items", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive_limit_s", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tokenize_speed.json"))
    args = parser.parse_args()

    from llmrec.tokens import RecVocab

    tokenizer = load_tokenizer(args.tokenizer)
    vocab = RecVocab(len(tokenizer), args.n_users, args.n_items)
    prompts = make_prompts(args.n_prompts, args.n_users, args.n_items, args.history, args.seed)
    fast_ids = [vocab.encode(p, tokenizer) for p in prompts]
    per_prompt_s = best_of(lambda: [vocab.encode(p, tokenizer) for p in prompts], args.repeats)
    batch_s = best_of(lambda: vocab.encode_batch(prompts, tokenizer), args.repeats)
    assert vocab.encode_batch(prompts, tokenizer) == fast_ids

    naive = run_naive(args, prompts)
    check = naive.pop("check_ids", None)
    same = None if check is None else check == fast_ids[:CHECK]
    done, naive_loop_s = naive.get("per_prompt", (0, float("nan")))

    n = len(prompts)
    tokens = sum(len(x) for x in fast_ids)
    print(f"{n} prompts, {tokens / n:.1f} tokens each, vocabulary {vocab.total_size:,} ids "
          f"({args.n_users:,} users + {args.n_items:,} items above {vocab.base_size:,} base)")  # fmt: skip
    print(f"{'path':<44}{'seconds':>10}{'µs/prompt':>11}")
    print(
        f"{'RecVocab.encode (one call per prompt)':<44}{per_prompt_s:>10.3f}{1e6 * per_prompt_s / n:>11.1f}"
    )
    print(f"{'RecVocab.encode_batch':<44}{batch_s:>10.3f}{1e6 * batch_s / n:>11.1f}")
    print(f"{'naive: add_tokens (one-off setup)':<44}{naive.get('add_tokens_s', float('nan')):>10.3f}")
    if done:
        label = f"naive: encode per prompt ({done}/{n} done)"
        print(f"{label:<44}{naive_loop_s:>10.3f}{1e6 * naive_loop_s / done:>11.1f}")
    if "batch_s" in naive:
        print(
            f"{'naive: tokenizer(prompts) batch':<44}{naive['batch_s']:>10.3f}{1e6 * naive['batch_s'] / n:>11.1f}"
        )
    if not naive["finished"]:
        print(f"naive path did not finish within --naive_limit_s {args.naive_limit_s:.0f}s")
    if "added_tokens_rss_mib" in naive:
        print(f"naive: memory added by add_tokens ~{naive['added_tokens_rss_mib']:.0f} MiB (max RSS growth)")
    print(f"same ids on the first {CHECK} prompts: {same}")

    result = {
        "machine": machine_info(),
        "config": vars(args),
        "fast": {"per_prompt_s": per_prompt_s, "batch_s": batch_s, "tokens_per_prompt": tokens / n},
        "naive": {**naive, "per_prompt_done": done, "per_prompt_s": naive_loop_s, "same_ids": same},
    }
    write_report(args.out, result)


if __name__ == "__main__":
    main()
