"""The run directory: its one home, for the side that writes it (training, evaluation, the prior's blend)
and the side that reads it (evaluation, alignment, export and its model card).

A run directory (``--output_dir`` of ``recipes/pretrain.py``, ``finetune.py``, ``align.py``)::

    run_config.json     every knob the run was started with, nested as the YAML (:func:`write_run_config`;
                        its marker: ``--overwrite_output_dir`` replaces only a directory that has one)
    metrics.jsonl       one JSON record per log line and per validation, appended (:func:`append_metrics`);
                        a resumed run drops those after its checkpoint (:func:`truncate_metrics`)
    metrics.json        the evaluations of ``recipes/evaluate.py``, merged by split (:func:`record_evaluation`)
    checkpoints/        ``checkpoint_STEP/`` (:func:`checkpoints_dir`; the format is `llmrec.checkpoint`'s)
    model/, best/       model directories (`llmrec.model`: ``CLLM4Rec.save_pretrained``/``from_pretrained``);
                        ``best/`` when validation kept one, and then the run's model (:func:`run_model_dir`)
    prior_weight.json   the prior's blend weight chosen on valid, with the sha256 of the model it was
                        chosen for (:func:`write_prior_weight`, read back by :func:`run_prior_weight`)
    tensorboard/        accelerate's tracker (``--tensorboard``)

Readers that want several of these at once (export: config, model, prior weight, metrics) read them
once with :meth:`Run.read`. Importing this module loads no model code (torch, transformers): the model
loads in :meth:`Run.model` / :func:`run_model`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.artifacts import Kind, check_inputs, hold_lock, recover
from common.errors import UserError
from common.io import ArtifactError, read_json, sha256_file, write_json, write_text

if TYPE_CHECKING:
    from llmrec.model import CLLM4Rec

logger = logging.getLogger(__name__)

CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"  # training's log and validation records
RESULTS_FILE = "metrics.json"  # recipes/evaluate.py's evaluations
PRIOR_FILE = "prior_weight.json"  # the prior blend weight, chosen on valid after training
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR, FINAL_DIR = "best", "model"  # validation's best model, the model training ended with
MODEL_DIRS = (BEST_DIR, FINAL_DIR)  # the run's model: best/ when validation kept one, else model/
# a run directory: --overwrite_output_dir deletes RUN_OUTPUTS only where run_config.json says it is one
RUN = Kind("run directory", CONFIG_FILE, flag="--overwrite_output_dir")
RUN_OUTPUTS = (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    BEST_DIR,
    METRICS_FILE,
    RESULTS_FILE,
    CONFIG_FILE,
    "tensorboard",
    PRIOR_FILE,  # recipes/finetune.py, after training
)


class RunError(UserError):
    """A run directory or checkpoint that cannot be used as asked (missing, damaged, or a previous run in
    the way)."""


# ---------------------------------------------------------------------------------------------- writing
def claim_output_dir(
    out: str | Path,
    inputs: Mapping[str, str | Path | None] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    main: bool = True,
) -> bool:
    """Check a run's ``out`` before any work, then take its lock (``main`` process only; `common.artifacts`).

    Refused: an ``out`` that is, contains or lies inside an input of the run (``--init``, ``--data``),
    even with ``resume``; a fresh run into a directory holding a previous run's results (they would be
    mixed or overwritten; ``resume`` continues it); ``overwrite`` on a directory without
    ``run_config.json`` (not a run: nothing is deleted); a directory another process is training into.
    Only then does ``overwrite`` delete the previous run's outputs (``RUN_OUTPUTS``, nothing else; the
    ``main`` process does). Returns True when it went that far (the caller's processes then wait for the
    main one).
    """
    out = Path(out)
    try:
        check_inputs(out, inputs or {}, RUN)
        if main:
            hold_lock(out)
    except ArtifactError as err:
        raise RunError(str(err)) from err
    used = [name for name in RUN_OUTPUTS if (out / name).exists() and name != RUN.marker]
    if not used or resume:
        return False
    if not overwrite:
        raise RunError(
            f"{out}: holds a previous run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite_output_dir to start afresh there, or choose another --output_dir"
        )
    if not RUN.owns(out):
        raise RunError(
            f"{out}: holds {', '.join(used)} but no {RUN.marker}: not a run directory of llmrec, so "
            "--overwrite_output_dir deletes nothing there; choose another --output_dir"
        )
    if main:
        logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", ", ".join(used), out)
        for name in RUN_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return True


def write_run_config(run: str | Path, *configs: Any) -> Path:
    """Record every knob of a run (``run_config.json``, nested as the YAML: `llmrec.config.to_dict`) so
    that it can be repeated and evaluated later."""
    from llmrec.config import to_dict

    Path(run).mkdir(parents=True, exist_ok=True)
    return write_text(Path(run) / CONFIG_FILE, json.dumps(to_dict(*configs), indent=2))


def append_metrics(run: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record (a JSON line) to ``metrics.jsonl``; a line cut by a kill is dropped on resume
    (:func:`truncate_metrics`)."""
    path = Path(run) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run: str | Path, step: int) -> None:
    """Drop the records a resumed run will write again (those after the checkpoint's ``step``), and a last
    line cut by the kill that interrupted the run; a damaged line before it is a :class:`RunError`."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if number == len(lines):
                logger.warning("%s: dropping its last line, cut by an interrupted write", path)
                break
            raise RunError(
                f"{path}: line {number} is not a metrics record ({err}); repair or delete the file to resume"
            ) from err
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(kept))


def record_evaluation(run: str | Path, results: Mapping[str, Any], /, **meta: Any) -> Path:
    """Merge ``results`` (``{key: metrics}``, e.g. ``test`` or ``test/generate``) into ``metrics.json``,
    keeping the other keys' earlier evaluations; ``meta`` (``run``, ``data``) is written beside them."""
    from llmrec.metrics import write_metrics_json

    path = Path(run) / RESULTS_FILE
    previous = json.loads(path.read_text())["metrics"] if path.exists() else {}
    return write_metrics_json(path, {**previous, **results}, **meta)


def write_prior_weight(run: str | Path, directory: Path, weight: float, valid: dict) -> Path:
    """Record the prior blend weight chosen on valid for the run's model ``directory`` (``RUN/best`` or
    ``RUN/model``) as ``RUN/prior_weight.json``: the weight, the directory's name and the sha256 of its
    weights (so a model trained on afterwards is never blended at a weight chosen for another), and
    ``valid``, the score of every weight tried. The model directory itself is not rewritten."""
    record = {
        "prior_weight": weight,
        "model_dir": directory.name,
        "model_sha256": sha256_file(directory / "model.safetensors"),
        "valid": valid,
    }
    return write_json(Path(run) / PRIOR_FILE, record)


def checkpoints_dir(run: str | Path) -> Path:
    """Where a run's checkpoints live (``RUN/checkpoints``; `llmrec.checkpoint` writes and reads them)."""
    return Path(run) / CHECKPOINTS_DIR


# ---------------------------------------------------------------------------------------------- reading
def run_model_dir(run: str | Path) -> Path:
    """The model a run is evaluated and exported with: ``RUN/best`` when the run kept one, else ``RUN/model``."""
    run = Path(run)
    for name in MODEL_DIRS:
        recover(run / name)  # a save killed while renaming leaves the old or new model beside it
        if (run / name / "config.json").is_file():
            return run / name
    raise RunError(f"{run}: no trained model (expected {run}/best or {run}/model with config.json)")


def final_model_dir(run: str | Path, flag: str = "--init") -> Path:
    """``RUN/model``, written when a run finishes (finetuning's ``--init`` starts from it), or a
    :class:`RunError` saying why it is not there."""
    model = Path(run) / FINAL_DIR
    if not (model / "config.json").is_file():
        state = "is not a directory" if not Path(run).is_dir() else "has no model/ yet"
        raise RunError(
            f"{flag} {run}: {state} (a pretraining run writes model/ when it finishes); finish or "
            "--resume that run first, or pass the directory of a finished one"
        )
    return model


def read_prior_record(run: str | Path) -> dict | None:
    """``RUN/prior_weight.json`` checked for its shape, or None when the run has none."""
    path = Path(run) / PRIOR_FILE
    if not path.is_file():
        return None
    record = read_json(path, "prior weight record")
    if not isinstance(record, dict) or not isinstance(record.get("prior_weight"), (int, float)):
        raise RunError(f"{path}: not a prior weight record (a JSON object with a numeric prior_weight)")
    return record


def prior_weight_for(run: str | Path, record: dict | None, directory: Path) -> float | None:
    """The weight a prior ``record`` (:func:`read_prior_record`) holds for the model ``directory``; None
    when there is none, when the record predates the sha256 (such runs rewrote the weight into the model's
    config, which it is read from), or when the model changed since it was chosen (a warning says so)."""
    if record is None or "model_sha256" not in record:
        return None
    if (record.get("model_dir"), record["model_sha256"]) != (
        directory.name,
        sha256_file(directory / "model.safetensors"),
    ):
        logger.warning(
            "%s: the prior weight was chosen for an earlier %s (trained on since); the model blends at the "
            "weight saved with it. Choose again with llmrec.pipeline.blend_prior.",
            Path(run) / PRIOR_FILE,
            directory,
        )
        return None
    return float(record["prior_weight"])


def run_prior_weight(run: str | Path, directory: Path | None = None) -> float | None:
    """The prior blend weight ``RUN/prior_weight.json`` records for the run's model ``directory`` (default
    :func:`run_model_dir`); None when the run chose none (no prior, or stopped before choosing), when the
    file predates this record (such runs rewrote the weight into the model's config, which it is read
    from), or when the model changed since it was chosen (a warning says so)."""
    if not (Path(run) / PRIOR_FILE).is_file():
        return None
    directory = run_model_dir(run) if directory is None else Path(directory)
    return prior_weight_for(run, read_prior_record(run), directory)


def load_run_model(directory: Path, weight: float | None, **backbone_overrides: Any) -> CLLM4Rec:
    """The model directory's model, its item head blending the prior at ``weight`` (when not None)."""
    from llmrec.model import CLLM4Rec

    model = CLLM4Rec.from_pretrained(directory, **backbone_overrides)
    if weight is not None:
        model.head.set_prior_weight(weight)
    return model


def run_model(run: str | Path, **backbone_overrides: Any) -> CLLM4Rec:
    """The model a run is evaluated, aligned and exported with (:func:`run_model_dir`), its item head
    blending the prior at the weight finetuning chose for it on valid (:func:`run_prior_weight`).

    ``backbone_overrides`` go to `CLLM4Rec.from_pretrained`.
    """
    directory = run_model_dir(run)
    return load_run_model(directory, run_prior_weight(run, directory), **backbone_overrides)


def run_config(run: str | Path) -> dict:
    """A run's ``run_config.json`` (every knob it was started with)."""
    path = Path(run) / CONFIG_FILE
    config = read_json(path, "run configuration")
    if not isinstance(config, dict):
        raise RunError(f"{path}: not a run configuration (a JSON object)")
    return config


def config_data(run: str | Path, config: dict) -> str:
    """The dataset bundle a run's ``config`` names."""
    if not isinstance(config.get("data"), str):
        raise RunError(f"{Path(run) / CONFIG_FILE}: names no dataset bundle; pass it with --data")
    return config["data"]


def run_data(run: str | Path) -> str:
    """The dataset bundle a run trained on, from its ``run_config.json``."""
    return config_data(run, run_config(run))


def run_task(run: str | Path) -> str:
    """The finetuning task of a run (``multinomial`` for pretraining runs and runs that predate tasks)."""
    return run_config(run).get("task", "multinomial")


def _read_json_or_none(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_metrics(run: str | Path) -> dict[str, dict[str, float]]:
    """Evaluations recorded in a run: the best validation evaluation of training (``metrics.jsonl``) as
    ``valid (during training, step N)``, and every entry of ``metrics.json`` (``recipes/evaluate.py``)."""
    run = Path(run)
    found: dict[str, dict[str, float]] = {}
    path = run / METRICS_FILE
    if path.is_file():
        evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval/' in line]
        if evals:
            key = next((k for k in ("eval/recall@20", "eval/ndcg@10") if k in evals[0]), None)
            best = max(evals, key=lambda e: e[key]) if key else evals[-1]
            metrics = {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("eval/")}
            found[f"valid (during training, step {best['step']})"] = metrics
    for name, metrics in ((_read_json_or_none(run / RESULTS_FILE) or {}).get("metrics") or {}).items():
        if isinstance(metrics, dict):
            found[name] = metrics
    return found


@dataclass(frozen=True)
class Run:
    """What a run directory records, read once (:meth:`read`): its path, ``run_config.json``, the model
    directory it is used with, its prior weight record and its evaluations. The model itself loads with
    :meth:`model`."""

    path: Path
    config: dict[str, Any]
    model_dir: Path
    prior: dict[str, Any] | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def read(cls, run: str | Path) -> Run:
        """Read a run (the checks of :func:`run_model_dir`, :func:`run_config` and the prior record's)."""
        run = Path(run)
        model_dir = run_model_dir(run)
        return cls(run, run_config(run), model_dir, read_prior_record(run), run_metrics(run))

    @property
    def task(self) -> str:
        """The finetuning task (``multinomial`` for pretraining runs and runs that predate tasks)."""
        return self.config.get("task", "multinomial")

    @property
    def data(self) -> str:
        """The dataset bundle the run trained on."""
        return config_data(self.path, self.config)

    @property
    def beam(self) -> int:
        """The run's ``eval.beam`` (0: none recorded, the protocol's largest cut-off)."""
        section = self.config.get("eval")
        beam = section.get("beam", 0) if isinstance(section, dict) else 0
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 0:
            raise UserError(
                f"{self.path / CONFIG_FILE}: field eval.beam must be a whole number >= 0, got {beam!r}"
            )
        return beam

    def model(self, **backbone_overrides: Any) -> CLLM4Rec:
        """The run's model (:func:`run_model`): its model directory, blending the prior at the weight
        the run chose for it (checked against that directory's weights)."""
        weight = prior_weight_for(self.path, self.prior, self.model_dir)
        return load_run_model(self.model_dir, weight, **backbone_overrides)
