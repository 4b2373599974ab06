"""Cost curves: how time and peak memory grow with the catalogue (10k / 100k / 1M items).

    python benchmarks/cost_curves.py [--items 10000 100000 1000000] [--build 100000 1000000 10000000]
        [--users 32] [--seed 0] [--out benchmarks/results/cost_curves.json]

On synthetic ML-1M-shaped logs (Zipf-like item popularity, log-normal user activity of at least 20
items, seeded), each measurement runs in a fresh subprocess so that its peak RSS is its own:

- ``build``: ``data_prep build`` of a log with N interactions over a catalogue (`data_prep_scale.py`);
- ``full`` / ``chunked`` / ``sampled``: one finetuning pass (forward, backward, AdamW step) of the
  multinomial item head over ``--users`` sampled users (batches of 8) of a 2-layer model (the built-in
  ``tiny-llama``, hidden 64, so a 1M-item table fits in memory), reported per user;
- ``evaluate``: full-catalogue scoring and ranking (llmrec.metrics) of the same users, in chunks of 8
  users, so no users x items matrix beyond one chunk is ever held;
- ``rqvae``: seconds per RQ-VAE epoch (default config; autoencoder epochs in the table, quantized
  and decoder-only epochs in the JSON) on random 384-d item embeddings; the default run is setup
  plus each phase's epochs times its cost.

Work is bounded by sampling users (the per-user cost of an epoch is what grows with the catalogue);
CPU seconds are reported next to wall seconds because the machine is shared. Prints a table and
writes JSON plus a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_prep_scale import generate  # noqa: E402

BATCH = 8
SOFTMAXES = ("full", "chunked", "sampled")


def peak_rss_mb() -> float:
    """This process's peak RSS since the last :func:`reset_peak` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart the peak-RSS count (``5`` to clear_refs resets VmHWM), so several measurements share one process."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def histories(n_users: int, n_items: int, seed: int) -> list[list[int]]:
    """ML-1M-shaped histories: log-normal lengths (at least 20, at most 200 here), Zipf(0.9) item popularity."""
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -0.9
    popularity /= popularity.sum()
    lengths = np.clip((20 + 145 * rng.lognormal(0.0, 1.0, n_users) / np.e**0.5).astype(int), 20, 200)
    return [np.unique(rng.choice(n_items, size=k, p=popularity)).tolist() for k in lengths]


def child_finetune(n_items: int, mode: str, users: int, seed: int) -> dict:
    """One finetuning pass over ``users`` synthetic users with the ``mode`` item softmax."""
    import torch

    from data_prep import Templates
    from llmrec.collate import FinetuneDataset, collate
    from llmrec.losses import ItemSoftmax
    from llmrec.model import CLLM4Rec
    from llmrec.options import BackboneConfig, ModelConfig
    from llmrec.prompts import FinetunePrompts

    torch.manual_seed(seed)
    model = CLLM4Rec.from_config(
        ModelConfig(max_doc_tokens=256, mutual_reg=0.0),
        BackboneConfig("tiny-llama"),
        users,
        n_items,
        seed=seed,
    )
    popularity = torch.arange(1, n_items + 1, dtype=torch.float64) ** -0.9
    model.item_softmax = ItemSoftmax(
        mode,
        chunk_size=max(1, n_items // 16),
        num_samples=8192,
        log_q=(popularity / popularity.sum()).log().float(),
    )
    prompts = FinetunePrompts(model.vocab, model.tokenizer, Templates().finetune, max_tokens=256)
    data = FinetuneDataset(histories(users, n_items, seed), prompts, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(data), BATCH):
        batch = collate([data[i] for i in range(start, min(start + BATCH, len(data)))])
        loss = model(batch)[0] / len(batch["user"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "s_per_user": (time.perf_counter() - wall) / users,
        "cpu_s_per_user": (time.process_time() - cpu) / users,
    }


def child_evaluate(n_items: int, users: int, seed: int) -> dict:
    """Score and rank the whole catalogue for ``users`` users, ``BATCH`` users at a time."""
    import scipy.sparse as sp

    from data_prep import Templates
    from llmrec.metrics import evaluate_matrices
    from llmrec.model import CLLM4Rec
    from llmrec.options import BackboneConfig, ModelConfig
    from llmrec.prompts import FinetunePrompts
    from llmrec.scoring import ItemHeadScorer

    model = CLLM4Rec.from_config(
        ModelConfig(max_doc_tokens=256), BackboneConfig("tiny-llama"), users, n_items, seed=seed
    ).eval()
    prompts = FinetunePrompts(model.vocab, model.tokenizer, Templates().finetune, max_tokens=256)
    rows = histories(users, n_items, seed)
    heldout = sp.csr_matrix(
        (np.ones(users), (np.arange(users), [r[-1] for r in rows])), shape=(users, n_items), dtype=np.float32
    )
    exclude = sp.csr_matrix(
        (
            np.ones(sum(len(r) - 1 for r in rows)),
            (np.repeat(np.arange(users), [len(r) - 1 for r in rows]), [i for r in rows for i in r[:-1]]),
        ),
        shape=(users, n_items),
    )
    scorer = ItemHeadScorer(model, prompts, [r[:-1] for r in rows], batch_size=BATCH)
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate_matrices(scorer, heldout, exclude, batch_size=BATCH)
    return {
        "s_per_user": (time.perf_counter() - wall) / users,
        "cpu_s_per_user": (time.process_time() - cpu) / users,
        "users": metrics["users"],
    }


def child_rqvae(n_items: int, seed: int, epochs: int = 5) -> dict:
    """Seconds per epoch of each phase of the default RQ-VAE on random 384-d embeddings (setup and
    k-means timed apart), and the default run they add up to."""
    import dataclasses

    import torch

    from llmrec.indexing.rqvae import RQVAEConfig, train_rqvae

    x = torch.randn(n_items, 384, generator=torch.Generator().manual_seed(seed))
    default = RQVAEConfig()
    # epochs are timed without k-means (its iterations depend on the latents, so differences of runs
    # with k-means would mostly time k-means); setup (model, k-means) is one run with it less an epoch
    base = dataclasses.replace(
        default, ae_epochs=1, epochs=0, decoder_epochs=0, dead_code_every=0, kmeans_init=False
    )

    def timed_run(**changes: int | bool) -> np.ndarray:
        wall, cpu = time.perf_counter(), time.process_time()
        train_rqvae(x, dataclasses.replace(base, **changes))
        return np.array([time.perf_counter() - wall, time.process_time() - cpu])

    one = timed_run()
    phases = ("ae_epochs", "epochs", "decoder_epochs")  # autoencoder, quantized, decoder-only
    per = {p: (timed_run(**{p: getattr(base, p) + epochs}) - one) / epochs for p in phases}
    setup_cpu = timed_run(kmeans_init=default.kmeans_init)[1] - per["ae_epochs"][1]
    return {
        "s_per_epoch": per["ae_epochs"][0],
        "cpu_s_per_epoch": per["ae_epochs"][1],
        "cpu_s_per_epoch_by_phase": {p: v[1] for p, v in per.items()},
        "setup_cpu_s": setup_cpu,
        "default_run_cpu_s": setup_cpu + sum(getattr(default, p) * per[p][1] for p in phases),
        "default_epochs": {p: getattr(default, p) for p in phases},
    }


def child_build(n_interactions: int, n_items: int, seed: int) -> dict:
    from data_prep.build import BuildConfig, build

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "log"
        source.mkdir()
        shape = generate(source, n_interactions, seed, n_items=n_items)
        before = peak_rss_mb()
        wall, cpu = time.perf_counter(), time.process_time()
        build(
            BuildConfig(
                format="movielens", input=str(source), out=str(Path(tmp) / "bundle"), split="random", seed=0
            )
        )
        counts = json.loads((Path(tmp) / "bundle" / "manifest.json").read_text())["counts"]
    return {
        **shape,
        "counts": counts,
        "s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "generator_peak_rss_mb": before,
    }


def run_child(*argv: str) -> dict | list[dict]:
    """Measurements in a fresh interpreter (its own peak RSS)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_catalogue(n_items: int, users: int, seed: int) -> list[dict]:
    """Every softmax and the evaluation at one catalogue size, each with its own peak RSS."""
    rows = []
    for kind in (*SOFTMAXES, "evaluate"):
        reset_peak()
        before = peak_rss_mb()
        result = (
            child_finetune(n_items, kind, users, seed)
            if kind in SOFTMAXES
            else child_evaluate(n_items, users, seed)
        )
        rows.append(
            {"kind": kind, "items": n_items, **result, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}
        )
    return rows


def child_main(kind: str, *args: str) -> None:
    numbers = [int(a) for a in args]
    if kind == "catalogue":
        print(json.dumps(child_catalogue(*numbers)))
        return
    children = {"rqvae": child_rqvae, "build": child_build}
    print(json.dumps({**children[kind](*numbers), "peak_rss_mb": peak_rss_mb()}))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in (*SOFTMAXES, "evaluate"):
        points = sorted((r["items"], r) for r in rows if r["kind"] == name)
        if not points:
            continue
        label = f"finetune, {name} softmax" if name in SOFTMAXES else "evaluate (full catalogue)"
        left.plot([p[0] for p in points], [1e3 * p[1]["cpu_s_per_user"] for p in points], "o-", label=label)
        right.plot([p[0] for p in points], [p[1]["peak_rss_mb"] for p in points], "o-", label=label)
    for axis, title in ((left, "CPU ms per user"), (right, "peak RSS (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("catalogue size (items)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("llmrec cost vs catalogue size (2-layer tiny-llama, hidden 64, batch 8, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--build", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--build_items", type=int, default=100_000, help="catalogue of the build logs")
    parser.add_argument("--rqvae_items", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--users", type=int, default=32, help="users sampled per finetuning/eval run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cost_curves.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    from llmrec.reporting import machine_info, write_report

    rows = []
    for n in args.items:
        rows += run_child("catalogue", str(n), str(args.users), str(args.seed))
        print(rows[-4:], file=sys.stderr)
    for n in args.rqvae_items:
        rows.append({"kind": "rqvae", "items": n, **run_child("rqvae", str(n), str(args.seed))})
        print(rows[-1], file=sys.stderr)
    for n in args.build:
        rows.append(
            {
                "kind": "build",
                "items": args.build_items,
                **run_child("build", str(n), str(args.build_items), str(args.seed)),
            }
        )
        print(rows[-1], file=sys.stderr)

    machine = machine_info()
    print(
        f"cost curves, seed {args.seed}, {args.users} users per run, load average {machine['load_average_1_5_15min']}"
    )
    print(
        f"{'kind':<10}{'items':>10}{'interactions':>14}{'wall s':>10}{'CPU s':>10}{'unit':>12}{'peak RSS MB':>13}"
    )
    for r in rows:
        if r["kind"] == "build":
            wall, cpu, unit, inter = (
                r["s"],
                r["cpu_s"],
                "build",
                r["counts"].get("interactions", r["interactions"]),
            )
        elif r["kind"] == "rqvae":
            wall, cpu, unit, inter = r["s_per_epoch"], r["cpu_s_per_epoch"], "per epoch", "-"
        else:
            wall, cpu, unit, inter = r["s_per_user"], r["cpu_s_per_user"], "per user", "-"
        print(
            f"{r['kind']:<10}{r['items']:>10,}{inter!s:>14}{wall:>10.3f}{cpu:>10.3f}{unit:>12}{r['peak_rss_mb']:>13.0f}"
        )
    out = Path(args.out)
    write_report(
        out,
        {"machine": machine, "config": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows},
    )
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
