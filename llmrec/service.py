"""The scoring side of the HTTP service: one worker thread owns the `Recommender`, batches reads, applies
and journals changes.

Why one thread: a `Recommender` serialises its calls (one lock per instance), so several threads would
only queue on it, and on a CPU one forward already uses the cores it is given. So every call goes through a queue
that one worker drains in arrival order. Consecutive reads are grouped: cold histories waiting at most
``max_wait_ms`` for up to ``max_batch`` of them to run as one forward (a padded batch of prompts), known
users taking whatever is queued (their cached states cost one head product). A known user's answer is
also kept until the next change (``answer_cache`` entries): asking the same question again is answered
from it on the caller's thread, without the queue (`Service.answered`). A change (`update`,
`add_items`) is never reordered with the reads around it and is appended to the journal
(`common.journal.Journal`, fsync'd) before it is acknowledged; the journal is replayed at start, so
nothing acknowledged is lost by a crash. Every answer carries ``version``, the number of changes applied
before it: replaying the changes serially and asking each read at its version gives the same answer.

Metrics (`prometheus_client`, into the registry given): batch sizes by kind, known-user cache hits and
misses, changes by operation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from common.errors import UserError
from common.io import ArtifactError
from common.journal import Journal
from llmrec.bundle import read_config
from llmrec.recommender import Recommendation, Recommender

logger = logging.getLogger(__name__)

READS = ("user", "history")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Job:
    """One queued call: ``kind`` (a read in READS, ``update``, ``add_items`` or ``call``), its arguments, the
    future its caller waits on, and when it arrived (``time.monotonic``)."""

    kind: str
    args: dict[str, Any]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


def journal_owner(bundle: str | Path) -> str:
    """What ties a journal to its bundle: the checksum of the bundle's config.json."""
    return f"bundle:{read_config(bundle)['checksum']}"


def check_options(max_batch: int, max_wait_ms: float, answer_cache: int) -> None:
    """The service's knobs, checked by :class:`Service` and by ``recipes/serve.py`` before it loads anything."""
    if max_batch < 1 or max_wait_ms < 0 or answer_cache < 0:
        raise UserError(
            "max_batch must be >= 1, max_wait_ms >= 0 and answer_cache >= 0, got "
            f"{max_batch}, {max_wait_ms} and {answer_cache}"
        )


class Service:
    """``Service(recommender, journal=None, max_batch=32, max_wait_ms=5.0, registry=None,
    answer_cache=100_000)``; the journal's records are replayed onto the recommender at construction.
    Methods return `concurrent.futures.Future`s of JSON-ready dicts; errors a caller can fix are
    `common.errors.UserError`s (`common.errors.NotFoundError` for an unknown id). :meth:`close` stops the
    worker."""

    def __init__(
        self,
        recommender: Recommender,
        journal: Journal | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        registry: CollectorRegistry | None = None,
        answer_cache: int = 100_000,
    ):
        check_options(max_batch, max_wait_ms, answer_cache)
        self.rec, self.journal = recommender, journal
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        # (user, k, exclude) -> a known user's answer at the current version; written by the worker only
        self.answer_cache, self._answers = answer_cache, {}
        self.version = 0
        registry = registry if registry is not None else CollectorRegistry()
        self.batch_sizes = Histogram(
            "llmrec_batch_size",
            "Requests per scoring batch",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "llmrec_user_cache",
            "Known-user reads by whether their state was cached",
            ["result"],
            registry=registry,
        )
        self.changes = Counter("llmrec_changes", "Changes applied, by operation", ["op"], registry=registry)
        answers = Counter(
            "llmrec_answer_cache",
            "Known-user reads answered from the answers kept since the last change, or not",
            ["result"],
            registry=registry,
        )
        self._answer_hit, self._answer_miss = answers.labels("hit"), answers.labels("miss")
        for number, record in enumerate(journal.records if journal else [], 2):
            try:
                self._apply(record)
            except (UserError, KeyError, TypeError) as err:
                raise ArtifactError(
                    f"line {number}: cannot replay {record!r} ({err})", file=journal.path
                ) from err
        if self.version:
            logger.info("replayed %d change(s) from %s", self.version, journal.path)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="llmrec-scoring", daemon=True)
        self._worker.start()

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        journal: str | Path | None = None,
        warm: bool = True,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        registry: CollectorRegistry | None = None,
        answer_cache: int = 100_000,
        **load: Any,
    ) -> Service:
        """Load and verify ``bundle`` (``load``: `Recommender.from_pretrained` options), replay its journal
        (default ``BUNDLE/journal.jsonl``) and, with ``warm``, cache every known user's state."""
        rec = Recommender.from_pretrained(bundle, **load)
        path = Path(journal) if journal is not None else Path(bundle) / "journal.jsonl"
        journal = Journal(path, journal_owner(bundle))
        if warm:  # before the worker starts: nothing else touches the recommender yet
            rec.warm_cache()
        return cls(rec, journal, max_batch, max_wait_ms, registry, answer_cache)

    # ------------------------------------------------------------------ calls (any thread)
    def recommend_user(self, user: str, k: int = 10, exclude: Sequence[str] = ()) -> Future:
        answer = self.answered(user, k, exclude)
        if answer is not None:
            future: Future = Future()
            future.set_result(answer)
            return future
        self._answer_miss.inc()
        return self._submit("user", user=user, k=k, exclude=list(exclude))

    def answered(self, user: str, k: int = 10, exclude: Sequence[str] = ()) -> dict[str, Any] | None:
        """The answer :meth:`recommend_user` gave to the same question since the last change, or None.

        Any thread, no queue: the worker fills the answers and empties them when it applies a change,
        before the change is acknowledged, so a read sent after an acknowledged change never gets an
        answer from before it (and every answer still carries the version it was computed at)."""
        answer = self._answers.get((user, k, tuple(exclude)))
        if answer is None:
            return None
        self._answer_hit.inc()
        return {"version": answer["version"], "items": [dict(item) for item in answer["items"]]}  # a copy

    def recommend_history(self, history: Sequence[str], k: int = 10, exclude: Sequence[str] = ()) -> Future:
        return self._submit("history", history=list(history), k=k, exclude=list(exclude))

    def update(self, user: str, items: Sequence[str]) -> Future:
        return self._submit("update", user=user, items=list(items))

    def add_items(self, items: Sequence[dict[str, str]]) -> Future:
        return self._submit("add_items", items=[dict(item) for item in items])

    def call(self, function: Callable[[Recommender], dict[str, Any]]) -> Future:
        """``function(recommender)`` on the worker, between the other calls (a consistent read); its dict
        gets ``version``."""
        return self._submit("call", function=function)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._worker.join()

    def _submit(self, kind: str, **args: Any) -> Future:
        job = Job(kind, args)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the service is closed")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while (batch := self._next()) is not None:
            try:
                if batch[0].kind in READS:
                    self._read(batch)
                else:
                    batch[0].future.set_result(self._change(batch[0]))
            except Exception as err:  # noqa: BLE001  (the caller's future carries it)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _next(self) -> list[Job] | None:
        """The next job, or a run of consecutive reads: up to max_batch, waiting until max_wait after the
        first when it is a cold history (known users take only what is already queued)."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            if batch[0].kind not in READS:
                return batch
            deadline = batch[0].arrived + (self.max_wait if batch[0].kind == "history" else 0)
            while len(batch) < self.max_batch:
                if self._queue and self._queue[0].kind in READS:
                    batch.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if self._queue or remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            return batch

    def _read(self, batch: list[Job]) -> None:
        for kind in READS:
            jobs = [job for job in batch if job.kind == kind]
            if not jobs:
                continue
            self.batch_sizes.labels(kind).observe(len(jobs))
            try:
                answers = self._recommend(kind, jobs)
            except UserError:  # one bad request: answer each alone, so only it fails
                for job in jobs:
                    try:
                        job.future.set_result(self._recommend(kind, [job])[0])
                    except UserError as err:
                        job.future.set_exception(err)
                continue
            for job, answer in zip(jobs, answers, strict=True):
                job.future.set_result(answer)

    def _recommend(self, kind: str, jobs: list[Job]) -> list[dict[str, Any]]:
        k = max(job.args["k"] for job in jobs)
        exclude = [job.args["exclude"] for job in jobs]
        if kind == "user":
            users = [job.args["user"] for job in jobs]
            hits = sum(self.rec.cached(users))
            lists = self.rec.recommend_batch(users, k=k, exclude=exclude)
            self.cache.labels("hit").inc(hits)
            self.cache.labels("miss").inc(len(users) - hits)
        else:
            lists = self.rec.recommend_batch(
                histories=[job.args["history"] for job in jobs], k=k, exclude=exclude
            )
        answers = [
            {"version": self.version, "items": [_record(r) for r in top[: job.args["k"]]]}
            for job, top in zip(jobs, lists, strict=True)
        ]
        if kind == "user" and self.answer_cache:
            for job, answer in zip(jobs, answers, strict=True):
                if len(self._answers) >= self.answer_cache:
                    self._answers.clear()  # a new generation rather than an LRU: readers need no lock
                self._answers[(job.args["user"], job.args["k"], tuple(job.args["exclude"]))] = answer
        return answers

    def _change(self, job: Job) -> dict[str, Any]:
        if job.kind == "call":
            return {**job.args["function"](self.rec), "version": self.version}
        record = {"op": job.kind, **job.args}
        answer = self._apply(record)
        if self.journal is not None:
            self.journal.append(record)  # on disk before the caller hears of it
        return answer

    def _apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """Apply one change (a request, or a journal record at start) and count it."""
        op = record["op"]
        self._answers.clear()  # before anything changes: no answer outlives the version it was given at
        if op == "update":
            incremental = self.rec.update(record["user"], record["items"])
            answer = {"user": record["user"], "history_length": len(self.rec.history(record["user"]))}
            answer["incremental"] = incremental
        elif op == "add_items":
            try:
                indices = self.rec.add_items(record["items"])
            except UserError:
                raise
            except ValueError as err:  # the mapper's checks of the new items (ids, titles) and the model
                raise UserError(str(err)) from err
            answer = {
                "items": [
                    {"id": item["id"], "index": i} for item, i in zip(record["items"], indices, strict=True)
                ]
            }
        else:
            raise KeyError(f"unknown change {op!r}")
        self.version += 1
        self.changes.labels(op).inc()
        return {**answer, "version": self.version}


def serial_replay(
    rec: Recommender, calls: Sequence[tuple[str, dict[str, Any], dict[str, Any]]], tolerance: float = 1e-4
) -> list[str]:
    """Check answers given under concurrency against a serial replay on ``rec`` (a fresh load of the same
    bundle and journal); returns one line per answer that differs (none: all equal).

    ``calls`` are ``(kind, arguments, answer)`` with the kinds and keyword arguments of :class:`Service`'s
    methods (``user``, ``history``, ``update``, ``add_items``). The changes are applied in the order of
    their answers' versions; each read is asked between them, at its answer's version, one at a time.
    Lists must hold the same items and scores within ``tolerance`` (a batched forward pads its prompts).
    """
    changes = sorted((c for c in calls if c[0] not in READS), key=lambda c: c[2]["version"])
    reads = sorted((c for c in calls if c[0] in READS), key=lambda c: c[2]["version"])
    base = changes[0][2]["version"] - 1 if changes else min((c[2]["version"] for c in reads), default=0)
    if [c[2]["version"] for c in changes] != list(range(base + 1, base + 1 + len(changes))):
        return [f"the changes' versions {[c[2]['version'] for c in changes]} are not consecutive"]
    mismatches, position = [], 0
    for step in range(len(changes) + 1):
        while position < len(reads) and reads[position][2]["version"] <= base + step:
            kind, args, answer = reads[position]
            position += 1
            target = {"user": args["user"]} if kind == "user" else {"history": args["history"]}
            expected = rec.recommend(**target, k=args["k"], exclude=args.get("exclude", ()))
            got = answer["items"]
            same = [r["item"] for r in got] == [r.item for r in expected] and all(
                abs(r["score"] - e.score) <= tolerance for r, e in zip(got, expected, strict=True)
            )
            if not same:
                mismatches.append(f"{kind} {args} at version {answer['version']}: {got} != {expected}")
        if step < len(changes):
            kind, args, _ = changes[step]
            rec.update(**args) if kind == "update" else rec.add_items(args["items"])
    return mismatches


def _record(recommendation: Recommendation) -> dict[str, Any]:
    return {"item": recommendation.item, "title": recommendation.title, "score": recommendation.score}
