"""Memory and time of one finetuning step against the number of users, for each user-table option.

    python benchmarks/id_tables_scale.py [--users 100000 1000000 10000000] [--items 100000]
        [--budget_gb 6] [--seed 0] [--out benchmarks/results/id_tables_scale.json]

Each (option, users) point runs in a fresh subprocess, so its peak RSS is its own: a CLLM4Rec with both
views' ID tables at SmolLM2-135M's width (576) on a 1-layer random Llama of that width (the backbone's
depth does not change what the user tables cost), the multinomial item head over the whole catalogue
(full softmax), batches of 16 users with 20-item histories and 10 targets, one warm-up step (which
allocates the optimizer state) and 3 timed steps (median wall and CPU seconds) of forward, backward, clipping and
`llmrec.optim.RowSparseAdamW`. A point whose analytic estimate exceeds ``--budget_gb`` is not run: its
row is the estimate (marked so), the measured peak of the ``none`` option at the same catalogue plus
the user tables' bytes (``bytes_per_user_element`` x elements x 2 views). Measured points carry the
estimate too, to show how far it is off. Prints a table; writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost_curves import peak_rss_mb  # noqa: E402

HIDDEN = 576  # SmolLM2-135M
BATCH, HISTORY, TARGETS, STEPS = 16, 20, 10, 3
OPTIONS: dict[str, dict] = {  # name -> ModelConfig fields
    "full": {"user_table": "full"},
    "full, sparse": {"user_table": "full", "sparse_updates": True},
    "lowrank 32": {"user_table": "lowrank", "user_rank": 32},
    "lowrank 32, sparse": {"user_table": "lowrank", "user_rank": 32, "sparse_updates": True},
    "hashed 2x65536": {"user_table": "hashed", "user_buckets": 65536, "user_hashes": 2},
    "hashed 2x65536, sparse": {
        "user_table": "hashed",
        "user_buckets": 65536,
        "user_hashes": 2,
        "sparse_updates": True,
    },
    "none": {"user_table": "none"},
}


def user_elements(fields: dict, users: int) -> int:
    """Floats one view's user table holds."""
    kind = fields["user_table"]
    if kind == "full":
        return users * HIDDEN
    if kind == "lowrank":
        return users * fields["user_rank"] + fields["user_rank"] * HIDDEN
    if kind == "hashed":
        return fields["user_buckets"] * HIDDEN
    return HIDDEN


def bytes_per_element(fields: dict) -> int:
    """fp32 weight + Adam's two moments, + a dense gradient unless the rows update sparsely."""
    return 12 if fields.get("sparse_updates") else 16


def user_bytes(fields: dict, users: int) -> int:
    return 2 * user_elements(fields, users) * bytes_per_element(fields)  # two views: collab and content


def one_point(fields: dict, users: int, items: int, seed: int) -> dict:
    """Build the model and time its steps (runs in the child process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmrec.backbone import load_backbone
    from llmrec.model import CLLM4Rec
    from llmrec.optim import RowSparseAdamW, clip_sparse_grad_norm_
    from llmrec.options import BackboneConfig, ModelConfig
    from llmrec.prompts import TASKS
    from llmrec.tokens import RecVocab

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rss_start = peak_rss_mb()
    _, tokenizer = load_backbone(BackboneConfig("tiny-llama"))
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=1536,
            num_hidden_layers=1,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        )
    ).requires_grad_(False)
    vocab = RecVocab(lm.get_input_embeddings().weight.shape[0], users, items)
    start = time.perf_counter()
    model = CLLM4Rec(lm, tokenizer, vocab, ModelConfig(lora_r=8, **fields), BackboneConfig("tiny-llama"))
    build_s = time.perf_counter() - start
    optimizer = RowSparseAdamW(model.param_groups(1e-3, 1e-2))
    generator = torch.Generator().manual_seed(seed)
    times, cpu_times = [], []
    for step in range(STEPS + 1):
        rows = torch.randint(users, (BATCH, 1), generator=generator)
        history = torch.randint(items, (BATCH, HISTORY), generator=generator)
        user_tokens = vocab.family_range("user").start + rows
        ids = torch.cat([user_tokens, vocab.family_range("item").start + history, user_tokens], dim=1)
        batch = {
            "task": torch.tensor([TASKS.index("finetune")]),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "targets": torch.randint(items, (BATCH, TARGETS), generator=generator),
        }
        start, cpu_start = time.perf_counter(), time.process_time()
        lm_sum, lm_count, reg_sum, reg_count = model(batch)
        (lm_sum / lm_count + reg_sum / reg_count.clamp(min=1)).backward()
        clip_sparse_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step allocates Adam's state
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "peak_rss_mb": peak_rss_mb(),
        "start_rss_mb": rss_start,
        "build_s": build_s,
        "step_s": sorted(times)[len(times) // 2],
        "step_cpu_s": sorted(cpu_times)[len(cpu_times) // 2],  # CPU seconds: less hit by the shared machine
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--budget_gb", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/id_tables_scale.json")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # child: JSON [option, users]
    args = parser.parse_args(argv)
    if args.point:
        name, users = json.loads(args.point)
        print(json.dumps(one_point(OPTIONS[name], users, args.items, args.seed)))
        return {}
    names = list(args.options)
    # the "none" option first: its peak is the base every estimate adds the user tables to
    names.sort(key=lambda name: name != "none")
    base: dict[int, float] = {}
    rows = []
    for name in names:
        for users in sorted(args.users):
            fields = OPTIONS[name]
            row = {
                "option": name,
                "users": users,
                "items": args.items,
                "user_table_mb": user_bytes(fields, users) / 2**20,
            }
            if base:
                row["estimate_mb"] = min(base.values()) + row["user_table_mb"]
            if row.get("estimate_mb", 0) > args.budget_gb * 1024:
                row["measured"] = False
                rows.append(row)
                print(f"{name:24s} {users:>10,d} users: estimate {row['estimate_mb']:,.0f} MB (not run)")
                continue
            command = [sys.executable, __file__, "--items", str(args.items), "--seed", str(args.seed)]
            result = subprocess.run(
                [*command, "--point", json.dumps([name, users])], capture_output=True, text=True, cwd=REPO
            )
            if result.returncode != 0:
                raise SystemExit(f"{name} at {users} users failed:\n{result.stderr[-2000:]}")
            row.update(json.loads(result.stdout.strip().splitlines()[-1]), measured=True)
            if name == "none":
                base[users] = row["peak_rss_mb"]
            rows.append(row)
            print(
                f"{name:24s} {users:>10,d} users: peak {row['peak_rss_mb']:,.0f} MB, "
                f"step {row['step_s'] * 1000:,.0f} ms ({row['step_cpu_s'] * 1000:,.0f} ms CPU), build {row['build_s']:.1f} s"
            )
    from llmrec.reporting import machine_info

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "hidden": HIDDEN,
        "batch": BATCH,
        "history": HISTORY,
        "targets": TARGETS,
        "timed_steps": STEPS,
        "seed": args.seed,
        "budget_gb": args.budget_gb,
        "options": OPTIONS,
        "machine": machine_info(),
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2))
    plot(out.with_suffix(".png"), rows)
    return record


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(dict.fromkeys(row["option"] for row in rows)):
        mine = [row for row in rows if row["option"] == name]
        users = [row["users"] for row in mine]
        peak = [row["peak_rss_mb"] if row["measured"] else row["estimate_mb"] for row in mine]
        memory.plot(users, [p / 1024 for p in peak], color=f"C{i}", label=name, linestyle="-")
        measured = [(u, p) for u, p, row in zip(users, peak, mine, strict=True) if row["measured"]]
        estimated = [(u, p) for u, p, row in zip(users, peak, mine, strict=True) if not row["measured"]]
        if measured:
            memory.scatter(*zip(*[(u, p / 1024) for u, p in measured], strict=True), color=f"C{i}")
        if estimated:
            memory.scatter(
                *zip(*[(u, p / 1024) for u, p in estimated], strict=True),
                facecolors="none",
                edgecolors=f"C{i}",
            )
        timed = [(row["users"], row["step_cpu_s"]) for row in mine if row["measured"]]
        if timed:
            speed.plot(*zip(*timed, strict=True), color=f"C{i}", marker="o", label=name)
    memory.set(xscale="log", yscale="log", xlabel="users", ylabel="peak RSS, GB (hollow: estimate)")
    memory.set_title("one finetuning step, 100k items, width 576")
    speed.set(xscale="log", xlabel="users", ylabel="CPU seconds per step (median of 3)")
    speed.set_title("step time (measured points only)")
    memory.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
