"""The one training loop, shared by pretraining and finetuning, on top of accelerate.

accelerate does devices, DDP/FSDP/DeepSpeed, mixed precision, gradient accumulation and checkpoint state;
this file is the loop itself, readable top to bottom: batches -> losses -> backward -> step -> log ->
checkpoint -> (evaluate, keep the best, stop early).

Batches are *global*: the accelerator splits every batch over the processes (``split_batches=True``) and
each loss is divided by its count summed over all processes, so N processes follow the same loss curve
as one process with the same batch. Checkpoints hold only the trainable weights (LoRA, ID tables, head)
plus accelerate's optimizer/scheduler/RNG state, and resuming continues the exact same run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.artifacts import (
    Kind,
    check_inputs,
    commit,
    disk_error,
    disk_full,
    hold_lock,
    recover_all,
    release_lock,
)
from common.config import ConfigError
from common.early_stopping import EarlyStopping
from common.io import ArtifactError, file_records, verify_files, write_json, write_text
from common.log import get_logger
from llmrec.collate import TaskBucketSampler, collate
from llmrec.config import to_dict
from llmrec.model import CLLM4Rec, RunError
from llmrec.optim import RowSparseAdamW, clip_sparse_grad_norm_, has_sparse_grads
from llmrec.options import TrainConfig
from llmrec.prompts import TASKS

logger = get_logger(__name__)
STATE_FILE = "trainer_state.json"


def make_accelerator(
    config: TrainConfig, inputs: Mapping[str, str | Path | None] | None = None
) -> Accelerator:
    """The run's accelerator, after :func:`prepare_output_dir` has checked ``output_dir`` against the
    run's ``inputs`` (``{"--init": ..., "--data": ...}``) and taken its lock."""
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        project_config=ProjectConfiguration(project_dir=config.output_dir),
        log_with="tensorboard" if config.tensorboard else None,
        # steps that touch only one view leave the other view's tables without gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    _fsdp_on_cpu(accelerator)
    prepare_output_dir(config, accelerator, inputs)
    return accelerator


# a run directory: --overwrite_output_dir deletes RUN_OUTPUTS only where run_config.json says it is one
RUN = Kind("run directory", "run_config.json", flag="--overwrite_output_dir")
CHECKPOINT_KIND = Kind("checkpoint", STATE_FILE)
RUN_OUTPUTS = (
    "checkpoints",
    "model",
    "best",
    "metrics.jsonl",
    "metrics.json",
    "run_config.json",
    "tensorboard",
    "prior_weight.json",  # recipes/finetune.py, after training
)


def prepare_output_dir(
    config: TrainConfig, accelerator: Accelerator, inputs: Mapping[str, str | Path | None] | None = None
) -> None:
    """Check ``output_dir`` before any work, then take its lock for the run (`common.artifacts`).

    Refused: an ``output_dir`` that is, contains or lies inside an input of the run (``--init``,
    ``--data``), even with ``--resume``; a fresh run into a directory holding a previous run's results
    (they would be mixed or overwritten; ``--resume`` continues it); ``--overwrite_output_dir`` on a
    directory without ``run_config.json`` (not a run: nothing is deleted); a directory another process is
    training into. Only then does ``--overwrite_output_dir`` delete the previous run's outputs
    (``RUN_OUTPUTS``, nothing else).
    """
    out = Path(config.output_dir)
    try:
        check_inputs(out, inputs or {}, RUN)
        if accelerator.is_main_process:
            hold_lock(out)
    except ArtifactError as err:
        raise RunError(str(err)) from err
    used = [name for name in RUN_OUTPUTS if (out / name).exists() and name != RUN.marker]
    if not used or config.resume:
        return
    if not config.overwrite_output_dir:
        raise RunError(
            f"{out}: holds a previous run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite_output_dir to start afresh there, or choose another --output_dir"
        )
    if not RUN.owns(out):
        raise RunError(
            f"{out}: holds {', '.join(used)} but no {RUN.marker}: not a run directory of llmrec, so "
            "--overwrite_output_dir deletes nothing there; choose another --output_dir"
        )
    if accelerator.is_main_process:
        logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", ", ".join(used), out)
        for name in RUN_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint_STEP`` directories of a run, oldest first. A checkpoint is written under a temporary
    name and renamed when complete, so these are complete; a directory without its trainer state (left
    by versions that saved in place) is not counted."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("_")[1]))


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Honour an FSDP launch config on CPU processes (gloo), which accelerate would silently run as DDP.

    accelerate 1.15 switches its state to FSDP only for accelerator devices (``AcceleratorState``
    checks MULTI_GPU/NPU/XPU/...), while torch's FSDP2 ``fully_shard`` runs on CPU with gloo; so a
    CPU launch with ``recipes/accelerate/fsdp.yaml`` gets the FSDP plugin of that config here.
    """
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        for shared in (PartialState(), state):  # every AcceleratorState() re-reads PartialState's copy
            shared.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def settle_checkpoints(accelerator: Accelerator, output_dir: str | Path) -> None:
    """Finish the renames of a save a kill interrupted (`common.artifacts.recover`: the old or the new
    checkpoint comes back complete), then remove what no complete checkpoint needs: temporary directories
    and ``checkpoint_STEP`` directories without a trainer state (saved in place by older versions).
    The main process does it, the others wait, so that every process then lists the same checkpoints."""
    folder = Path(output_dir) / "checkpoints"
    if accelerator.is_main_process and folder.is_dir():
        recover_all(folder)
        for stale in folder.iterdir():
            if (
                stale.name.startswith(".checkpoint_")
                and stale.name.endswith(".tmp")
                or (CHECKPOINT.match(stale.name) and not (stale / STATE_FILE).is_file())
            ):
                logger.warning("removing %s, left incomplete by an interrupted save", stale)
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: dict, keep: int) -> Path:
    """Save accelerate's state plus ``state`` as ``checkpoints/checkpoint_STEP``, atomically.

    Everything is written to ``.checkpoint_STEP.tmp`` (the trainer state, with the size and sha256 of
    every file, last) and renamed in by `common.artifacts.commit`: a checkpoint of the same step (a run
    resumed from its last one, or the end-of-run save) moves aside and is deleted only once the new one
    is in place, so a kill at any moment leaves a complete checkpoint of that step. Then only the
    ``keep`` newest complete checkpoints are kept. A full disk is a one-line :class:`RunError`.
    """
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"checkpoint_{state['step']}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    settle_checkpoints(accelerator, output_dir)
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / STATE_FILE, {**state, "files": file_records(tmp, exclude=STATE_FILE)})
            commit(tmp, final)
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    except Exception as err:
        reason = disk_full(err)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(str(disk_error(reason, final, CHECKPOINT_KIND))) from err
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict:
    """Restore accelerate's state from ``checkpoint`` after checking every file against the sizes and
    sha256s recorded at save time; returns the trainer state."""
    state_path = checkpoint / STATE_FILE
    advice = "delete this checkpoint to resume from the one before, or start afresh"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunError(f"{state_path}: not a trainer state ({err}); {advice}") from err
    try:
        verify_files(checkpoint, state.get("files", {}), state_path)
    except ArtifactError as err:
        raise RunError(f"{err}; {advice}") from err
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # torch, safetensors and accelerate raise many types for a damaged file
        raise RunError(f"{checkpoint}: cannot restore ({type(err).__name__}: {err}); {advice}") from err
    return {key: value for key, value in state.items() if key != "files"}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a resumed run will write again (those after the checkpoint's step), and a last
    line cut by the kill that interrupted the run; a damaged line before it is a :class:`RunError`."""
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


def register_trainable_checkpointing(accelerator: Accelerator) -> None:
    """Checkpoint only the trainable weights; the frozen backbone is rebuilt from its spec on resume."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            weights[i] = accelerator.unwrap_model(model).trainable_state_dict()

    def load_hook(models, input_dir):
        for model in models:
            accelerator.unwrap_model(model).load_trainable(Path(input_dir) / "model.safetensors")
        models.clear()

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return  # sharded engines save and load their own (sharded) model state
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def clip_gradients(accelerator: Accelerator, model: nn.Module, max_norm: float) -> None:
    """accelerate's clipping, or, with sparse user-table gradients (which torch's refuses), ours."""
    if has_sparse_grads(model.parameters()):
        accelerator.unscale_gradients()
        clip_sparse_grad_norm_(model.parameters(), max_norm)
    else:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)


def train(
    model: CLLM4Rec,
    dataset: Dataset,
    config: TrainConfig,
    accelerator: Accelerator,
    evaluate: Callable[[CLLM4Rec], dict[str, float]] | None = None,
    metric_for_best: str | None = None,
) -> dict:
    """Train ``model`` on ``dataset`` (rows of one or several TASKS); returns the final trainer state.

    With ``evaluate``, the model is evaluated after every epoch, the best one by ``metric_for_best``
    is saved in ``output_dir/best`` and training stops after ``config.patience`` epochs without progress.
    """
    out = Path(config.output_dir)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and model.config.sparse_updates:
        raise ConfigError(
            "sparse_updates: FSDP and DeepSpeed shard dense gradients only; use DDP, or sparse_updates false",
            field="sparse_updates",
        )
    set_seed(config.seed)
    sampler = TaskBucketSampler(dataset, config.batch_size, seed=config.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_token_id=model.tokenizer.pad_token_id or 0),
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),  # keep global RNG (dropout) untouched by loader
    )
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    optimizer = RowSparseAdamW(  # AdamW; also steps sparse user tables (ModelConfig.sparse_updates)
        model.param_groups(config.lr, config.embedding_lr or config.lr, config.weight_decay)
    )
    scheduler = get_scheduler(
        config.scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    register_trainable_checkpointing(accelerator)

    state = {"step": 0, "epoch": 0, "best": None, "best_step": None, "evals_without_improvement": 0}
    metrics_file = out / "metrics.jsonl"
    if config.resume:
        settle_checkpoints(accelerator, out)
    if config.resume and (checkpoint := latest_checkpoint(out)) is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if accelerator.is_main_process:
            _truncate_metrics(metrics_file, state["step"])
        logger.warning("resuming from %s (step %d of %d)", checkpoint, state["step"], total_steps)
    elif config.resume:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", out / "checkpoints")
    if config.tensorboard:
        accelerator.init_trackers("tensorboard")

    def checkpoint() -> None:
        save_checkpoint(accelerator, out, state, config.save_total_limit)

    # per-task (loss sum, count) and the token count since the last log line, summed on this process's
    # device: one reduction and one host sync per log line instead of five every step
    names = (*TASKS, "reg", "tokens")
    window = torch.zeros(len(names), 2, device=accelerator.device)  # float32: MPS has no float64
    window_start = time.perf_counter()
    progress = tqdm(
        total=total_steps, initial=state["step"], disable=not accelerator.is_main_process, desc="train"
    )
    world = accelerator.num_processes
    model.train()
    stop = state["step"] >= total_steps
    while not stop:
        epoch = state["epoch"]
        # accelerate's loader re-seeds the sampler from its own pass counter at every pass, and a resumed
        # run's loader starts counting at 0: set it, so that resuming after epoch 0 replays the right order
        # (skip_first_batches copies the counter)
        loader.set_epoch(epoch)
        skip = (state["step"] - epoch * steps_per_epoch) * config.grad_accum
        batches = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        for batch in batches:
            with accelerator.accumulate(model):
                task = TASKS[int(batch["task"][0])]
                lm_sum, lm_count, reg_sum, reg_count = model(batch)
                # divide by counts over all processes: DDP's gradient mean then equals the global per-token mean
                lm_total = accelerator.reduce(lm_count.detach().float(), "sum").clamp(min=1)
                reg_total = accelerator.reduce(reg_count.detach().float(), "sum").clamp(min=1)
                loss = (lm_sum / lm_total + reg_sum / reg_total) * world
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    clip_gradients(accelerator, model, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window[TASKS.index(task)] += torch.stack([lm_sum.detach().float(), lm_count.float()])
            window[-2] += torch.stack([reg_sum.detach().float(), reg_count.float()])
            window[-1, 0] += batch["attention_mask"].sum()
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            progress.update(1)
            if state["step"] % config.log_steps == 0 or state["step"] == total_steps:
                totals = accelerator.reduce(window, "sum").tolist()
                record = {
                    "step": state["step"],
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": totals[-1][0] / (time.perf_counter() - window_start),
                }
                losses = {name: s / n for name, (s, n) in zip(names, totals, strict=True) if n > 0}
                record.update({f"loss/{name}": value for name, value in losses.items()})  # tokens: n == 0
                log_record(accelerator, metrics_file, record, state["step"])
                progress.set_postfix(
                    {k.split("/")[-1]: round(v, 4) for k, v in record.items() if k.startswith("loss/")}
                )
                window.zero_()
                window_start = time.perf_counter()
            if config.save_steps and state["step"] % config.save_steps == 0:
                checkpoint()
            if state["step"] >= total_steps:
                stop = True
                break
        else:
            state["epoch"] += 1
            stop = stop or state["epoch"] >= config.epochs and config.max_steps <= 0
        if evaluate is not None:
            stop = (
                evaluate_and_select(
                    model, evaluate, metric_for_best, config, accelerator, state, metrics_file
                )
                or stop
            )
    progress.close()
    checkpoint()
    save_model(accelerator, model, out / "model")
    accelerator.end_training()
    release_lock(out)
    return state


def evaluate_and_select(model, evaluate, metric_for_best, config, accelerator, state, metrics_file) -> bool:
    """Evaluate, keep the best model in ``output_dir/best``; True when patience has run out."""
    model.eval()
    with torch.no_grad():
        metrics = evaluate(accelerator.unwrap_model(model))
    model.train()
    log_record(
        accelerator,
        metrics_file,
        {"step": state["step"], "epoch": state["epoch"], **{f"eval/{k}": v for k, v in metrics.items()}},
        state["step"],
    )
    if metric_for_best is None:
        return False
    stopping = EarlyStopping(
        config.patience, state["best"], state["best_step"], state["evals_without_improvement"]
    )
    improved = stopping.update(metrics[metric_for_best], state["step"])
    state.update(
        best=stopping.best, best_step=stopping.best_at, evals_without_improvement=stopping.without_gain
    )
    if improved:
        save_model(accelerator, model, Path(config.output_dir) / "best")
    return stopping.stop


def save_model(accelerator: Accelerator, model: CLLM4Rec, directory: Path) -> None:
    """``save_pretrained`` from the main process, with the weights gathered first where they are sharded."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every process calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict)
    accelerator.wait_for_everyone()


def log_record(accelerator: Accelerator, path: Path, record: dict, step: int) -> None:
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        )
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)


def save_run_config(accelerator: Accelerator, output_dir: str | Path, *configs) -> None:
    """Record every knob of a run (``run_config.json``) so that it can be repeated and evaluated later."""
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "run_config.json").write_text(json.dumps(to_dict(*configs), indent=2))
