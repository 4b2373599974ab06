"""The export walk, counted: how often ``recipes/export.py`` climbs back up before an artefact is done.

Builds the 30-user synthetic dataset of ``tests/test_recommender.py``, finetunes tiny-llama for 3 steps,
exports the run twice with ``--merge true --overwrite true`` (the second export replaces the first, so the
overwrite check runs too) and traces the second one: every Python call (``sys.setprofile``) and every
file-system access (audit events ``open``, ``os.listdir``, ``os.scandir``, ``os.rename``, ``os.mkdir``,
``os.remove``, ``shutil.rmtree``, ``tempfile.mkstemp``..., plus ``os.stat`` and safetensors'
``save_file``/``load_file``, which have none).

Method. Each file access is charged to an artefact by its path: the run's model directory (``RUN/best``,
``RUN/model``), the rest of the run directory, the dataset bundle's embedding cache, the rest of the
dataset bundle, the export bundle (with the temporary siblings of its guarded write); a directory listed
to find a target's temporary siblings (`common.artifacts`) counts for that target, and paths resolved by
``common.artifacts.check_inputs`` only to compare them are no access. A *descent* is one call made by the
export's orchestration (``recipes/export.py``, ``llmrec/export.py``) into another module: the access
belongs to the call directly below the innermost orchestration frame on the stack. An artefact touched
from N descents made the walk climb back up to the orchestration and come down again N - 1 times: those
are its *climbs*. Separately, *upward calls* are calls from a module into one of a higher layer
(``tests/test_architecture.py``; recipes on top) from the call of ``llmrec.export.export_run`` on (the
arguments parsed): callbacks against the layer order.

    python benchmarks/export_walk.py [--repo CHECKOUT] [--work DIR] [--out FILE]

``--repo`` measures another checkout (an older commit) with this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_prep", "llmrec", "recipes")
ORCHESTRATION = {"recipes.export", "llmrec.export"}
EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "os.rename",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "os.chmod",
    "shutil.rmtree",
    "tempfile.mkstemp",
    "tempfile.mkdtemp",
}


def recipe(repo: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", repo / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"recipes_{name}"] = module
    spec.loader.exec_module(module)
    return module.main


def tiny_run(repo: Path, work: Path) -> tuple[Path, Path]:
    """The dataset bundle and finetuning run of tests/test_recommender.py's fixtures."""
    import numpy as np

    from data_prep.build import BuildConfig, build

    data, run = work / "bundle", work / "run"
    if not (data / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        popularity = 1.0 / np.arange(1, 41)
        rows = ["user_id,item_id,timestamp"]
        for user in range(30):
            items = rng.choice(40, 12, replace=False, p=popularity / popularity.sum())
            rows += [f"u{user},m{item},{user * 100 + t}" for t, item in enumerate(items)]
        (work / "log.csv").write_text("\n".join(rows) + "\n")
        titles = ["item_id,title"] + [f"m{i},Movie number {i}" for i in range(40)]
        (work / "items.csv").write_text("\n".join(titles) + "\n")
        config = BuildConfig(
            format="csv",
            input=str(work / "log.csv"),
            item_meta=str(work / "items.csv"),
            out=str(data),
            time_col="timestamp",
            seed=0,
        )
        build(config)
    if not (run / "model").is_dir():
        argv = [
            "--data",
            str(data),
            "--name_or_path",
            "tiny-llama",
            "--lora_r",
            "4",
            "--output_dir",
            str(run),
        ]
        recipe(repo, "finetune")(
            [*argv, "--max_steps", "3", "--batch_size", "8", "--epochs", "1", "--lr", "0.01"]
        )
    return data, run


class Tracer:
    """Calls between project modules and file accesses charged to artefacts, while ``active``."""

    def __init__(self, repo: Path, roots: dict[str, list[Path]]):
        self.repo = repo
        self.roots = {name: [Path(os.path.abspath(p)) for p in paths] for name, paths in roots.items()}
        self.modules: dict[str, str | None] = {}
        self.numbers: dict[int, int] = {}  # id(frame) -> call number, while the frame lives
        self.count = 0
        self.edges: list[tuple[str, str, str, str]] = []
        self.touches: list[tuple[str, int, str, str, str]] = []
        self.active = self.busy = False

    def module(self, code) -> str | None:
        name = self.modules.get(code.co_filename, "")
        if name == "":
            try:
                rel = Path(code.co_filename).resolve().relative_to(self.repo)
            except ValueError:
                rel = None
            name = None
            if rel is not None and rel.parts[0] in PACKAGES and rel.suffix == ".py":
                parts = list(rel.with_suffix("").parts)
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            self.modules[code.co_filename] = name
        return name

    def artefact(self, path: str | Path) -> str | None:
        path = Path(os.path.abspath(path))
        for name, roots in self.roots.items():
            for root in roots:
                if path == root or root in path.parents:
                    return name
                for p in (path, *path.parents):  # a temporary sibling of a guarded write (.NAME.*)
                    if p.parent == root.parent and p.name.startswith(f".{root.name}."):
                        return name
        return None

    def frames(self, frame):
        while frame is not None:
            yield frame
            frame = frame.f_back

    def record(self, path, event: str, frame) -> None:
        if self.busy or not self.active or isinstance(path, int) or path is None:
            return
        self.busy = True
        try:
            for f in self.frames(frame):
                if self.module(f.f_code) == "common.artifacts":
                    if f.f_code.co_name == "check_inputs":
                        return  # paths resolved to compare them: no artefact is read
                    if f.f_code.co_name == "_siblings":
                        path = f.f_locals.get("out", path)  # listed for that target's temporary siblings
                        break
            name = self.artefact(path)
            below = None
            for f in self.frames(frame):
                module = self.module(f.f_code)
                if module in ORCHESTRATION:
                    chosen = below if below is not None else f
                    where = f"{self.module(chosen.f_code)}:{chosen.f_code.co_qualname}"
                    if name is not None:
                        self.touches.append((name, self.numbers.get(id(chosen), -1), where, event, str(path)))
                    return
                if module is not None:
                    below = f
        finally:
            self.busy = False

    def profile(self, frame, event, arg) -> None:
        if event == "return":
            self.numbers.pop(id(frame), None)
            return
        if event != "call":
            return
        self.count += 1
        self.numbers[id(frame)] = self.count
        code = frame.f_code
        if code.co_name in ("save_file", "load_file") and "safetensors" in code.co_filename:
            self.record(frame.f_locals.get("filename"), f"safetensors.{code.co_name}", frame.f_back)
        callee = self.module(code)
        if callee is None or not self.active:
            return
        back = next((f for f in self.frames(frame.f_back) if self.module(f.f_code) is not None), None)
        if back is not None and self.module(back.f_code) != callee:
            self.edges.append((self.module(back.f_code), back.f_code.co_qualname, callee, code.co_qualname))

    def audit(self, event: str, args: tuple) -> None:
        if self.active and event in EVENTS and args:
            self.record(args[0], event, sys._getframe(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout to measure (default: this one)")
    parser.add_argument(
        "--work", default=None, help="where the dataset, run and bundle go (default: a temp dir)"
    )
    parser.add_argument("--out", default=None, help="write the report, descents and upward calls as JSON")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    sys.path[:0] = [str(repo), str(repo / "tests")]
    work = Path(args.work or tempfile.mkdtemp(prefix="export-walk-"))
    work.mkdir(parents=True, exist_ok=True)
    data, run = tiny_run(repo, work)
    export = recipe(repo, "export")
    out = work / "exported"
    argv = ["--run", str(run), "--out", str(out), "--merge", "true", "--overwrite", "true"]
    export(argv)  # the second export replaces this one: the overwrite check runs too
    roots = {
        "model directory": [run / "best", run / "model"],
        "run directory": [run],
        "embedding cache": [data / "embeddings"],  # indexing.encoders' MiniLM cache in the dataset bundle
        "dataset bundle": [data],
        "export bundle": [out],
    }
    tracer = Tracer(repo, roots)
    real_stat = os.stat

    def stat(path, *a, **k):
        tracer.record(path, "stat", sys._getframe(1))
        return real_stat(path, *a, **k)

    sys.addaudithook(tracer.audit)
    os.stat = stat
    tracer.active = True
    sys.setprofile(tracer.profile)
    try:
        export(argv)
    finally:
        sys.setprofile(None)
        tracer.active = False
        os.stat = real_stat

    import test_architecture

    def layer(module: str) -> int:
        top = len(test_architecture.LAYERS)
        return top if module.startswith("recipes") else test_architecture.layer_of(module)

    start = next(i for i, e in enumerate(tracer.edges) if e[2:] == ("llmrec.export", "export_run"))
    upward = sorted({e for e in tracer.edges[start:] if layer(e[2]) > layer(e[0])})  # after parsing
    descents = {}
    for name in roots:
        seen: dict[int, str] = {}
        for artefact, number, where, _, _ in tracer.touches:
            if artefact == name:
                seen.setdefault(number, where)
        descents[name] = list(seen.values())
    climbs = {name: max(len(found) - 1, 0) for name, found in descents.items()}
    report = {
        "repo": str(repo),
        "climbs": climbs,
        "climbs_total": sum(climbs.values()),
        "upward_calls": [f"{a}.{f} -> {b}.{g}" for a, f, b, g in upward],
        "descents": descents,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
