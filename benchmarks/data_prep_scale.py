"""How `data_prep build` scales: wall time and peak memory for synthetic ML-1M-style logs.

Each size is generated as MovieLens ``ratings.dat``/``movies.dat``/``users.dat`` files (Zipf-like
item popularity, log-normal user activity with at least 20 interactions, like ML-1M) and built in
a fresh subprocess with the default random 80/10/10 split, so that every peak-RSS figure belongs to
one build alone. "build s" is the wall time of ``build()``, "process s" adds interpreter start and
imports, "CPU s" is the child's user+system time (what contention on a shared machine cannot inflate).
Prints a table and writes JSON (default ``benchmarks/results/data_prep_scale.json``).

    python benchmarks/data_prep_scale.py [--sizes 100000 1000000 5000000] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]


def generate(directory: Path, n: int, seed: int, n_items: int | None = None) -> dict[str, int]:
    """An ML-1M-shaped log with about ``n`` interactions (ML-1M: 6,040 users, 3,706 items, 1M ratings).

    ``n_items`` fixes the catalogue (default: grows as sqrt(n) from ML-1M's); items are then drawn with
    replacement (vectorised, for catalogues of 1M items) and ``data_prep build`` collapses repeated pairs.
    """
    rng = np.random.default_rng(seed)
    n_users = max(100, n // 165)
    fixed = n_items is not None
    n_items = n_items if fixed else max(2000, int(3706 * (n / 1e6) ** 0.5))
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    per_user = 20 + np.floor(activity / activity.sum() * (n - 20 * n_users)).astype(np.int64)
    per_user[: n - per_user.sum()] += 1
    log_popularity = -0.9 * np.log(np.arange(1, n_items + 1))
    per_user = np.minimum(per_user, n_items)
    if fixed:
        popularity = np.exp(log_popularity - log_popularity.max())
        items = rng.choice(n_items, size=int(per_user.sum()), p=popularity / popularity.sum()) + 1
    else:
        # Distinct items per user (ML-1M has no repeated pairs): Zipf-like popularity, sampled without
        # replacement with the Gumbel top-k trick, one user at a time.
        items = np.concatenate(
            [np.argpartition(-(log_popularity + rng.gumbel(size=n_items)), k - 1)[:k] + 1 for k in per_user]
        )
    users = np.repeat(np.arange(1, n_users + 1), per_user)
    ratings = rng.integers(1, 6, size=len(users))
    times = 956_703_932 + rng.integers(0, 3 * 365 * 86_400, size=len(users))
    log = pd.DataFrame({"u": users, "i": items, "r": ratings, "t": times}).astype(str)
    (directory / "ratings.dat").write_text(
        "\n".join(log["u"] + "::" + log["i"] + "::" + log["r"] + "::" + log["t"]) + "\n"
    )
    ids = np.unique(items)  # as in MovieLens, metadata only for rated items (build refuses the others)
    titles = [f"Movie {i} ({1950 + i % 70})::{GENRES[i % 8]}|{GENRES[(i * 7) % 8]}" for i in ids]
    (directory / "movies.dat").write_text(
        "\n".join(f"{i}::{t}" for i, t in zip(ids, titles, strict=True)) + "\n"
    )
    ages = np.array([1, 18, 25, 35, 45, 50, 56])
    (directory / "users.dat").write_text(
        "\n".join(f"{u}::{'MF'[u % 2]}::{ages[u % 7]}::{u % 21}::{10000 + u}" for u in range(1, n_users + 1))
        + "\n"
    )
    return {"interactions": int(len(users)), "users": n_users, "items": n_items}


def run_one(source: str, out: str) -> None:
    """Child mode: build once and print time and this process's peak RSS as JSON."""
    from data_prep.build import BuildConfig, build

    start = time.perf_counter()
    build(BuildConfig(format="movielens", input=source, out=out, split="random", seed=0))
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime  # includes imports; unlike wall time, immune to other load
    print(
        json.dumps(
            {
                "build_s": round(seconds, 2),
                "cpu_s": round(cpu_s, 2),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep_scale.json"))
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(*args.child)
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "log"
            source.mkdir()
            shape = generate(source, n, args.seed)
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(source), str(Path(tmp) / "bundle")],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            process_s = time.perf_counter() - started
            result = json.loads(child.stdout.strip().splitlines()[-1])
            manifest = json.loads((Path(tmp) / "bundle" / "manifest.json").read_text())
        rows.append({**shape, **result, "process_s": round(process_s, 2), "counts": manifest["counts"]})
        print(f"done {n:,}: {result}", file=sys.stderr)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load} (a shared machine: wall times include contention, CPU s does not)"
    )
    print(f"data_prep build (movielens .dat, random 80/10/10 split, seed {args.seed}) on {machine}")
    print(
        f"{'interactions':>13} {'users':>8} {'items':>7} {'build s':>8} {'process s':>10} {'CPU s':>7} {'peak RSS MB':>12}"
    )
    for r in rows:
        print(
            f"{r['interactions']:>13,} {r['users']:>8,} {r['items']:>7,} {r['build_s']:>8.1f} "
            f"{r['process_s']:>10.1f} {r['cpu_s']:>7.1f} {r['peak_rss_mb']:>12.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": machine, "seed": args.seed, "split": "random 0.8/0.1/0.1", "rows": rows}, indent=2
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
