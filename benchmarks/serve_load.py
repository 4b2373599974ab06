"""Load test of the HTTP service (``recipes/serve.py``) over loopback, beside in-process `Recommender` calls.

Starts the service as a subprocess on 127.0.0.1 (a free port) and drives it with 1, 8 and 32 concurrent
closed-loop clients (each its own keep-alive connection, sending its next request when the last is
answered; `Connection`), every loop bounded by ``--requests`` per client and ``--seconds``:

- known users: ``GET /users/{user}/recommendations?k=10`` over sampled users (their states cached by
  one untimed request each: the server starts with ``--warm false``, warming all users takes minutes),
  with the service keeping answers until the next change (the default) and without
  (``--answer_cache 0``: every read scores the cached state);
- cold histories: ``POST /recommendations`` with a sampled user's training items as an unseen user's
  history, with request batching (``--max_batch``, ``--max_wait_ms``) and without (``--max_batch 1``);
- in process: ``Recommender.recommend`` on the same bundle and requests, one call at a time, and
  ``recommend_batch`` of ``--max_batch`` histories (the forward a full batch of the service runs);
- consistency: 32 clients mixing reads with ``update`` and ``add_items``; every answer is checked
  against a serial replay of the changes (`llmrec.service.serial_replay`).

The bundle is ``--bundle``, or with ``--data`` an untrained model of the quality recipe's shapes
(``recipes/configs/ml-100k-cpu.yaml``: SmolLM2-135M cut to 2 layers, LoRA r 8, tied head, pooled history,
EASE prior, 128-token prompts), exported once to ``--work`` (timing depends on the shapes, not the
weights). Prints a table and writes JSON (default ``benchmarks/results/serve_load.json``) and a PNG (``--plot``).

    python benchmarks/serve_load.py --data data/ml-100k [--seconds 20] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.recommender import Recommender  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402
from llmrec.service import serial_replay  # noqa: E402

CLIENTS = (1, 8, 32)
K = 10


def build_bundle(data: str, out: Path, seed: int) -> Path:
    """An untrained model of the quality recipe's shapes, with an EASE prior fit on train, exported once."""
    if (out / "config.json").is_file():
        return out
    from data_prep import load_bundle
    from llmrec.backbone import BackboneConfig
    from llmrec.baselines import EASE
    from llmrec.export import export_model
    from llmrec.model import CLLM4Rec, ModelConfig

    bundle = load_bundle(data)
    config = ModelConfig(lora_r=8, lora_alpha=16, max_doc_tokens=128, history_pool="mean", prior="ease")
    backbone = BackboneConfig("smollm2-135m", num_layers=2)
    model = CLLM4Rec.from_config(config, backbone, bundle.n_users, bundle.n_items, seed=seed)
    ease = EASE(lambdas=(500.0,))
    ease.fit(bundle.matrix("train"), None)
    with torch.no_grad():
        model.head.fit_prior(ease.weights)
    return export_model(model, bundle, out, overwrite=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(bundle: Path, journal: Path, *options: str):
    """``recipes/serve.py`` on 127.0.0.1 until the block ends; yields its base URL and pid once /healthz
    is 200."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        str(ROOT / "recipes" / "serve.py"),
        "--bundle",
        str(bundle),
        "--port",
        str(port),
    ]
    process = subprocess.Popen([*command, "--journal", str(journal), "--device", "cpu", *options], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while True:
            assert process.poll() is None, "the server exited"
            assert time.time() < deadline, "the server was not ready in 900 s"
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a request and reads its answer (Content-Length
    bodies, as every route of the service answers).

    Why not ``httpx.AsyncClient``: measured once on this benchmark's known-user loop at 32 clients (the
    2-core box, 2026-12-06, two training jobs on the cores), it spent 2.6 ms of CPU per request and
    answered 30 requests/s where this client spent 0.045 ms and the same server answered 580/s; on two
    cores shared with the server, httpx would be what the table measures. The table's ``client_cpu_ms``
    column is this client's cost."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        data = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        status = int((await self.reader.readline()).split()[1])
        length = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        assert length is not None, f"{method} {path}: an answer without Content-Length"
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def run_async(coroutine: Any) -> Any:
    """The client's loops on uvloop (the server's event loop too) when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(
    latencies: list[float],
    seconds: float,
    errors: int = 0,
    cpu: float | None = None,
    client_cpu: float | None = None,
) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    row = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "req_per_s": len(ms) / seconds,
        "requests": len(ms),
        "errors": errors,
    }
    if cpu is not None:  # the server's CPU time per answered request
        row["server_cpu_ms"] = 1000 * cpu / len(ms)
    if client_cpu is not None:  # this process's (the load generator's)
        row["client_cpu_ms"] = 1000 * client_cpu / len(ms)
    return row


async def drive(
    url: str, requests: list[Callable], clients: int, per_client: int, seconds: float, pid: int | None = None
) -> dict:
    """``clients`` closed loops, client c sending ``requests[(c + i * clients) % len]`` until it has sent
    ``per_client`` or ``seconds`` have passed; with ``pid`` (the server's), its CPU time per request."""
    latencies: list[float] = []
    errors = 0
    connections = await asyncio.gather(*(Connection.open(url) for _ in range(clients)))
    end = time.perf_counter() + seconds

    async def loop(c: int) -> None:
        nonlocal errors
        for i in range(per_client):
            if time.perf_counter() >= end:
                return
            start = time.perf_counter()
            status, _ = await requests[(c + i * clients) % len(requests)](connections[c])
            latencies.append(time.perf_counter() - start)
            errors += status != 200

    start, cpu, client_cpu = time.perf_counter(), cpu_seconds(pid) if pid else None, time.process_time()
    await asyncio.gather(*(loop(c) for c in range(clients)))
    cpu = cpu_seconds(pid) - cpu if pid else None
    client_cpu = time.process_time() - client_cpu
    for connection in connections:
        connection.close()
    return summary(latencies, time.perf_counter() - start, errors, cpu, client_cpu)


def known(user: str) -> Callable:
    path = f"/users/{quote(user, safe='')}/recommendations?k={K}"
    return lambda connection: connection.request("GET", path)


def cold(history: list[str]) -> Callable:
    body = {"history": history, "k": K}
    return lambda connection: connection.request("POST", "/recommendations", body)


def in_process(calls: list[Callable[[], Any]], per_call: int, seconds: float) -> dict:
    latencies, end, start = [], time.perf_counter() + seconds, time.perf_counter()
    for i in range(per_call):
        if time.perf_counter() >= end:
            break
        begin = time.perf_counter()
        calls[i % len(calls)]()
        latencies.append(time.perf_counter() - begin)
    return summary(latencies, time.perf_counter() - start)


async def mixed(url: str, rec: Recommender, clients: int, per_client: int, rng: random.Random) -> list[tuple]:
    """Reads, updates and new items from ``clients`` concurrent loops; returns (kind, args, answer)."""
    users, items = rec.catalogue.user_ids, rec.catalogue.item_ids
    calls: list[tuple] = []

    async def loop(c: int) -> None:
        connection = await Connection.open(url)
        for i in range(per_client):
            roll, n = rng.random(), c * per_client + i
            if roll < 0.1:
                args = {"user": rng.choice(users), "items": [rng.choice(items)]}
                path = f"/users/{quote(args['user'], safe='')}/interactions"
                status, body = await connection.request("POST", path, {"items": args["items"]})
                kind = "update"
            elif roll < 0.15:
                args = {
                    "items": [{"id": f"load-{n}", "title": f"{rng.choice(rec.catalogue.item_titles)} II"}]
                }
                (status, body), kind = await connection.request("POST", "/items", args), "add_items"
            elif roll < 0.6:
                args = {"user": rng.choice(users), "k": K}
                (status, body), kind = await known(args["user"])(connection), "user"
            else:
                args = {"history": rng.sample(items, 5), "k": K}
                (status, body), kind = await cold(args["history"])(connection), "history"
            assert status == 200, body
            calls.append((kind, args, json.loads(body)))
        connection.close()

    await asyncio.gather(*(loop(c) for c in range(clients)))
    return calls


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("known users", "known users, answers not kept", "cold, batching", "cold, no batching"):
        points = [(r["clients"], r) for key, r in rows.items() if key.startswith(name + " @")]
        clients = [c for c, _ in points]
        left.plot(clients, [r["p99_ms"] for _, r in points], marker="o", label=name)
        right.plot(clients, [r["req_per_s"] for _, r in points], marker="o", label=name)
    for axis, label in ((left, "p99 latency (ms)"), (right, "requests / s")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle("recipes/serve.py over loopback (2-layer SmolLM2, ML-100K)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="exported recommender bundle (recipes/export.py)")
    parser.add_argument("--data", default="data/ml-100k", help="dataset bundle, for an untrained model")
    parser.add_argument("--work", default="runs/serve_load", help="where the untrained bundle is exported")
    parser.add_argument("--requests", type=int, default=400, help="most requests per client and loop")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest a loop runs")
    parser.add_argument("--max_batch", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--mixed", type=int, default=30, help="requests per client of the consistency run")
    parser.add_argument("--users", type=int, default=128, help="sampled users (known users, cold histories)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "images" / "serve_load.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_before = time.time(), os.getloadavg()
    bundle = (
        Path(args.bundle) if args.bundle else build_bundle(args.data, Path(args.work) / "bundle", args.seed)
    )
    rec = Recommender.from_pretrained(bundle, device="cpu")
    rng = random.Random(args.seed)
    users = rng.sample(rec.catalogue.user_ids, min(args.users, rec.n_users))
    histories = [rec.history(u) for u in users]
    rows: dict[str, dict[str, Any]] = {}

    rec.warm_cache(users)
    rows["in-process known user"] = {
        "clients": 1,
        **in_process([lambda u=u: rec.recommend(u, k=K) for u in users], args.requests, args.seconds),
    }
    rows["in-process cold history"] = {
        "clients": 1,
        **in_process(
            [lambda h=h: rec.recommend(history=h, k=K) for h in histories], args.requests, args.seconds
        ),
    }
    batches = [histories[i : i + args.max_batch] for i in range(0, len(histories), args.max_batch)]
    batch = in_process(
        [lambda b=b: rec.recommend_batch(histories=b, k=K) for b in batches], len(batches), args.seconds
    )
    rows[f"in-process cold, batches of {args.max_batch}"] = {
        "clients": 1, **batch, "req_per_s": batch["req_per_s"] * args.max_batch,
    }  # fmt: skip

    known_users, cold_histories = [known(u) for u in users], [cold(h) for h in histories]

    def sweep(name: str, url: str, pid: int, requests: list[Callable]) -> None:
        """One row per client count in CLIENTS for ``requests`` on the running server."""
        for clients in CLIENTS:
            run = run_async(drive(url, requests, clients, args.requests, args.seconds, pid))
            rows[f"{name} @ {clients}"] = {"clients": clients, **run}

    with tempfile.TemporaryDirectory() as tmp:
        batching = ("--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms))
        with server(bundle, Path(tmp) / "on.jsonl", *batching, "--warm", "false") as (url, pid):
            run_async(drive(url, known_users, 8, len(users), 3600))  # caches their states (and answers)
            sweep("known users", url, pid, known_users)
            sweep("cold, batching", url, pid, cold_histories)
            calls = run_async(mixed(url, rec, 32, args.mixed, rng))
        scored = ("--answer_cache", "0", "--warm", "false")
        with server(bundle, Path(tmp) / "scored.jsonl", *scored) as (url, pid):
            run_async(drive(url, known_users, 8, len(users), 3600))  # caches their states
            sweep("known users, answers not kept", url, pid, known_users)
        with server(bundle, Path(tmp) / "off.jsonl", "--max_batch", "1", "--warm", "false") as (url, pid):
            sweep("cold, no batching", url, pid, cold_histories)
    mismatches = serial_replay(Recommender.from_pretrained(bundle, device="cpu"), calls)
    consistency = {
        "requests": len(calls),
        "changes": sum(kind in ("update", "add_items") for kind, _, _ in calls),
        "mismatches": len(mismatches),
        "first_mismatches": mismatches[:3],
    }
    speedup = rows["cold, batching @ 32"]["req_per_s"] / rows["cold, no batching @ 32"]["req_per_s"]
    print(
        format_table(
            rows,
            [
                "clients",
                "p50_ms",
                "p99_ms",
                "req_per_s",
                "server_cpu_ms",
                "client_cpu_ms",
                "requests",
                "errors",
            ],
        )
    )
    print(f"cold histories at 32 clients: batching {speedup:.2f}x the requests/s of no batching")
    print(f"consistency: {consistency['requests']} requests ({consistency['changes']} changes) under 32 clients, "
          f"{consistency['mismatches']} differ from a serial replay")  # fmt: skip
    setup = {
        "bundle": str(bundle)
        if args.bundle
        else f"untrained quality-recipe shapes on {args.data} (seed {args.seed})",
        "k": K,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "requests_per_client": args.requests,
        "seconds_per_loop": args.seconds,
        "sampled_users": len(users),
        "server_threads": "OMP_NUM_THREADS=1",
        "torch_threads": torch.get_num_threads(),
        "batching_speedup_at_32": speedup,
        "consistency": consistency,
        "load_average_before_after": [load_before, os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "machine": machine_info(),
    }
    write_metrics_json(args.out, rows, setup=setup)
    plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
