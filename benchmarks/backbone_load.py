"""Time backbone loading: the one-off GGUF conversion against the cached load, plus the tiny test models.

Each measurement runs ``load_backbone`` in the current process with a fresh cache directory (a temp dir unless
``--cache-dir`` is given), so the first SmolLM2 load always converts. Prints a table and writes JSON.

    python benchmarks/backbone_load.py [--spec smollm2-135m] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common.log import setup_logging
from llmrec import backbone
from llmrec.reporting import machine_info, write_report


def timed_load(spec: str, **kwargs) -> tuple[float, object, object]:
    start = time.perf_counter()
    model, tokenizer = backbone.load_backbone(spec, **kwargs)
    return time.perf_counter() - start, model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm2-135m", help="a GGUF alias or *.gguf path")
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time after the conversion")
    parser.add_argument("--cache-dir", default=None, help="conversion cache (default: a fresh temp dir)")
    parser.add_argument("--out", default="benchmarks/results/backbone_load.json")
    args = parser.parse_args()
    setup_logging("WARNING")

    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="llmrec-bench-") as tmp:
        cache_dir = args.cache_dir or tmp
        gguf = backbone.GGUF_ALIASES[args.spec]() if args.spec in backbone.GGUF_ALIASES else Path(args.spec)
        start = time.perf_counter()
        backbone.gguf_fingerprint(gguf)
        rows["cache key (hash GGUF header)"] = time.perf_counter() - start
        rows["first load (convert + load)"], model, tokenizer = timed_load(args.spec, cache_dir=cache_dir)
        n_params = model.num_parameters()
        cached = [timed_load(args.spec, cache_dir=cache_dir)[0] for _ in range(args.repeats)]
        rows[f"cached load (median of {args.repeats})"] = statistics.median(cached)
        rows["cached load, num_layers=4"] = timed_load(args.spec, cache_dir=cache_dir, num_layers=4)[0]
    for tiny in backbone.TINY_MODELS:
        rows[f"{tiny}"] = timed_load(tiny)[0]

    width = max(map(len, rows))
    print(f"{'step':<{width}}  seconds")
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:7.3f}")
    result = {
        "spec": args.spec,
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "parameters": n_params,
        "seconds": rows,
        "cached_loads": cached,
        "machine": machine_info(),
        "seed": backbone.TINY_SEED,
    }
    write_report(args.out, result)


if __name__ == "__main__":
    main()
