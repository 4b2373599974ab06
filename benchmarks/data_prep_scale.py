"""How `data_prep build` scales: wall time and peak memory for synthetic ML-1M-style logs.

Each size is generated as MovieLens ``ratings.dat``/``movies.dat``/``users.dat`` files (Zipf-like
item popularity, log-normal user activity with at least 20 interactions, like ML-1M) and built in
a fresh subprocess with the default random 80/10/10 split, so that every peak-RSS figure belongs to
one build alone (DuckDB runs inside that process, so its memory counts too). "build s" is the wall
time of ``build()``, "process s" adds interpreter start and imports, "CPU s" is the child's
user+system time (what contention on a shared machine cannot inflate).

``--shape ml1m`` (the default) grows the catalogue as sqrt(n) from ML-1M's and draws distinct items
per user; ``--shape wide`` is the issue-26 scale shape: n/100 users and n/1000 items (100M
interactions: 1M users, 100k items, every item with a title and genres), items drawn with
replacement from the same Zipf-like popularity (repeated pairs are collapsed by the build), written
a block of users at a time so that generating 100M rows needs little memory. Each size is built
with every engine of ``--engines`` (``memory`` only up to ``--memory_max`` interactions: beyond, it
would not fit the shared machine), the out-of-core engine once per ``--threads`` value (DuckDB's worker
threads; 0, the default, is DuckDB's own default of one per core). Prints a table, writes JSON (default
``benchmarks/results/data_prep_scale.json``; each row also lists the build's stages: every ``data_prep``
log line with the wall and CPU seconds since the build started) and with ``--plot`` a PNG of time and
memory against size.

    python benchmarks/data_prep_scale.py [--sizes 100000 1000000 5000000] [--seed 0] [--out FILE]
    python benchmarks/data_prep_scale.py --shape wide --sizes 10000000 30000000 100000000 \\
        --engines duckdb memory --threads 1 0 --plot docs/data_prep_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

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


def _lines(columns: list[np.ndarray], sep: str) -> pa.Table:
    """One-column table of ``sep``-joined numbers: written without header or quoting, a text file."""
    strings = [pc.cast(pa.array(c), pa.string()) for c in columns]
    return pa.table({"line": pc.binary_join_element_wise(*strings, sep)})


def _write_lines(fh, table: pa.Table) -> None:
    pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def generate_wide(directory: Path, n: int, seed: int, block_users: int = 50_000) -> dict[str, int]:
    """About ``n`` interactions by n/100 users over n/1000 items (see the module docstring), in
    MovieLens ``.dat`` files written a block of users at a time."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(100, n // 100), max(1000, n // 1000)
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    per_user = 20 + np.floor(activity / activity.sum() * (n - 20 * n_users)).astype(np.int64)
    per_user[: n - per_user.sum()] += 1
    per_user = np.minimum(per_user, n_items)
    popularity = np.arange(1, n_items + 1) ** -0.9
    popularity /= popularity.sum()
    start_time, span = 956_703_932, 3 * 365 * 86_400
    with open(directory / "ratings.dat", "wb") as fh:
        for start in range(0, n_users, block_users):
            counts = per_user[start : start + block_users]
            users = np.repeat(np.arange(start + 1, start + 1 + len(counts)), counts)
            items = rng.choice(n_items, size=len(users), p=popularity) + 1
            ratings = rng.integers(1, 6, size=len(users))
            times = start_time + rng.integers(0, span, size=len(users))
            _write_lines(fh, _lines([users, items, ratings, times], "::"))
    ids = np.arange(1, n_items + 1)
    titles = pc.binary_join_element_wise(
        pc.cast(pa.array(ids), pa.string()), pa.array([f"Movie {i} ({1950 + i % 70})" for i in ids]), "::"
    )
    genres = pa.array([f"{GENRES[i % 8]}|{GENRES[(i * 7) % 8]}" for i in ids])
    with open(directory / "movies.dat", "wb") as fh:
        _write_lines(fh, pa.table({"line": pc.binary_join_element_wise(titles, genres, "::")}))
    ages = np.array([1, 18, 25, 35, 45, 50, 56])
    users = np.arange(1, n_users + 1)
    gender = np.where(users % 2, "F", "M")
    with open(directory / "users.dat", "wb") as fh:
        _write_lines(fh, _lines([users, gender, ages[users % 7], users % 21, 10000 + users], "::"))
    return {"interactions": int(per_user.sum()), "users": n_users, "items": n_items}


def run_one(source: str, out: str, engine: str, threads: int = 0) -> None:
    """Child mode: build once and print time, this process's peak RSS and the build's stages as JSON
    (each ``data_prep`` log line with the wall and CPU seconds since the build started)."""
    import logging

    from data_prep.build import BuildConfig, build, choose_engine

    start, cpu_start = time.perf_counter(), time.process_time()
    stages = []

    class Stages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            stages.append([round(wall, 2), round(cpu, 2), record.getMessage()[:100]])

    logging.getLogger("data_prep").addHandler(Stages(logging.INFO))
    logging.getLogger("data_prep").setLevel(logging.INFO)
    config = BuildConfig(
        format="movielens", input=source, out=out, split="random", seed=0, engine=engine, threads=threads
    )
    used = choose_engine(config)
    build(config)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime  # includes imports; unlike wall time, immune to other load
    print(
        json.dumps(
            {
                "build_s": round(seconds, 2),
                "cpu_s": round(cpu_s, 2),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "duckdb_threads": duckdb_threads(threads) if used == "duckdb" else None,
                "stages": stages,
            }
        )
    )


def duckdb_threads(threads: int) -> int:
    """The thread count a build with ``--threads threads`` gives DuckDB (0: DuckDB's own default)."""
    import duckdb

    return threads or int(duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0])


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def plot(rows: list[dict], path: Path) -> None:
    """Build wall time and peak RSS against interactions, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    def label(r: dict) -> str:
        return r["engine"] if r["engine"] == "memory" else f"{r['engine']}, {r.get('duckdb_threads')} threads"

    for name in sorted({label(r) for r in rows}):
        mine = sorted((r for r in rows if label(r) == name), key=lambda r: r["interactions"])
        x = [r["interactions"] / 1e6 for r in mine]
        left.plot(x, [r["build_s"] / 60 for r in mine], "o-", label=name)
        right.plot(x, [r["peak_rss_mb"] / 1024 for r in mine], "o-", label=name)
    left.set(xlabel="interactions (millions)", ylabel="build wall time (min)", xscale="log")
    right.set(xlabel="interactions (millions)", ylabel="peak RSS (GB)", xscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("data_prep build (random split, seed 0) on the shared 2-core CPU machine")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=["ml1m", "wide"], default="ml1m")
    parser.add_argument("--engines", nargs="+", choices=["auto", "memory", "duckdb"], default=["auto"])
    parser.add_argument("--memory_max", type=int, default=10_000_000, help="largest size built in memory")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="DuckDB threads of the out-of-core builds, one build per value (0: DuckDB's default, one per core)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep_scale.json"))
    parser.add_argument("--plot", help="PNG of time and memory against size")
    parser.add_argument(
        "--child", nargs=4, metavar=("SOURCE", "OUT", "ENGINE", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        run_one(*args.child[:3], threads=int(args.child[3]))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "log"
            source.mkdir()
            started = time.perf_counter()
            shape = (
                generate_wide(source, n, args.seed)
                if args.shape == "wide"
                else generate(source, n, args.seed)
            )
            print(f"generated {n:,} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
            runs = [(e, t) for e in args.engines for t in (args.threads if e != "memory" else [0])]
            for engine, threads in runs:
                if engine == "memory" and n > args.memory_max:
                    continue
                load_before = load()
                started = time.perf_counter()
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(source),
                        str(Path(tmp) / engine),
                        engine,
                        str(threads),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                process_s = time.perf_counter() - started
                result = json.loads(child.stdout.strip().splitlines()[-1])
                manifest = json.loads((Path(tmp) / engine / "manifest.json").read_text())
                shutil.rmtree(Path(tmp) / engine)
                row = {
                    **shape,
                    "engine": engine,
                    "threads": threads,
                    **result,
                    "process_s": round(process_s, 2),
                }
                rows.append(
                    {**row, "load_before": load_before, "load_after": load(), "counts": manifest["counts"]}
                )
                print(f"done {n:,} {engine} threads {threads}: {result}", file=sys.stderr)
                write_json(out, args, rows)  # after every build: a long run keeps what it measured
    machine = (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load()} (a shared machine: wall times include contention, CPU s does not)"
    )
    print(
        f"data_prep build (movielens .dat, {args.shape} shape, random 80/10/10 split, seed {args.seed}) on {machine}"
    )
    print(
        f"{'interactions':>13} {'users':>9} {'items':>7} {'engine':>7} {'threads':>7} {'build s':>8} {'process s':>10} "
        f"{'CPU s':>7} {'peak RSS MB':>12} {'load before/after':>22}"
    )
    for r in rows:
        print(
            f"{r['interactions']:>13,} {r['users']:>9,} {r['items']:>7,} {r['engine']:>7} "
            f"{r['duckdb_threads'] or '-':>7} {r['build_s']:>8.1f} "
            f"{r['process_s']:>10.1f} {r['cpu_s']:>7.1f} {r['peak_rss_mb']:>12.0f} "
            f"{r['load_before'] + ' / ' + r['load_after']:>22}"
        )
    write_json(out, args, rows, machine)
    print(f"wrote {out}")
    if args.plot:
        plot(rows, Path(args.plot))


def write_json(out: Path, args: argparse.Namespace, rows: list[dict], machine: str | None = None) -> None:
    machine = machine or f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs (shared)"
    result = {
        "machine": machine,
        "seed": args.seed,
        "shape": args.shape,
        "split": "random 0.8/0.1/0.1",
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
