"""The one training loop, shared by pretraining and finetuning, on top of accelerate.

accelerate does devices, DDP/FSDP/DeepSpeed, mixed precision, gradient accumulation and checkpoint state;
this file is the loop itself, readable top to bottom: batches -> losses -> backward -> step -> log ->
checkpoint -> (evaluate, keep the best, stop early).

Batches are *global*: the accelerator splits every batch over the processes (``split_batches=True``) and
each loss is divided by its count summed over all processes, so N processes follow the same loss curve
as one process with the same batch. Checkpoints hold only the trainable weights (LoRA, ID tables, head)
plus accelerate's optimizer/scheduler/RNG state, and resuming continues the exact same run. What the run
writes where is the run directory's format (`llmrec.run`) and the checkpoint's (`llmrec.checkpoint`).
"""

from __future__ import annotations

import math
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

from common.artifacts import release_lock
from common.config import ConfigError
from common.early_stopping import EarlyStopping
from common.log import get_logger
from llmrec.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    register_trainable_checkpointing,
    save_checkpoint,
    settle_checkpoints,
)
from llmrec.collate import TaskBucketSampler, collate
from llmrec.model import CLLM4Rec
from llmrec.optim import RowSparseAdamW, clip_sparse_grad_norm_, has_sparse_grads
from llmrec.options import TrainConfig
from llmrec.prompts import TASKS
from llmrec.run import (
    BEST_DIR,
    FINAL_DIR,
    append_metrics,
    checkpoints_dir,
    claim_output_dir,
    truncate_metrics,
    write_run_config,
)

logger = get_logger(__name__)


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


def prepare_output_dir(
    config: TrainConfig, accelerator: Accelerator, inputs: Mapping[str, str | Path | None] | None = None
) -> None:
    """Check ``output_dir`` before any work and take its lock (`llmrec.run.claim_output_dir`, which may
    delete a previous run's outputs under ``--overwrite_output_dir``); the other processes wait for it."""
    cleared = claim_output_dir(
        config.output_dir,
        inputs,
        resume=config.resume,
        overwrite=config.overwrite_output_dir,
        main=accelerator.is_main_process,
    )
    if cleared:
        accelerator.wait_for_everyone()


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
    if config.resume:
        settle_checkpoints(accelerator, out)
    if config.resume and (checkpoint := latest_checkpoint(out)) is not None:
        state = load_checkpoint(accelerator, checkpoint)
        if accelerator.is_main_process:
            truncate_metrics(out, state["step"])
        logger.warning("resuming from %s (step %d of %d)", checkpoint, state["step"], total_steps)
    elif config.resume:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", checkpoints_dir(out))
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
                log_record(accelerator, out, record, state["step"])
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
                evaluate_and_select(model, evaluate, metric_for_best, config, accelerator, state, out) or stop
            )
    progress.close()
    checkpoint()
    save_model(accelerator, model, out / FINAL_DIR)
    accelerator.end_training()
    release_lock(out)
    return state


def evaluate_and_select(model, evaluate, metric_for_best, config, accelerator, state, run) -> bool:
    """Evaluate, keep the best model in ``output_dir/best``; True when patience has run out."""
    model.eval()
    with torch.no_grad():
        metrics = evaluate(accelerator.unwrap_model(model))
    model.train()
    log_record(
        accelerator,
        run,
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
        save_model(accelerator, model, Path(config.output_dir) / BEST_DIR)
    return stopping.stop


def save_model(accelerator: Accelerator, model: CLLM4Rec, directory: Path) -> None:
    """``save_pretrained`` from the main process, with the weights gathered first where they are sharded."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every process calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict)
    accelerator.wait_for_everyone()


def log_record(accelerator: Accelerator, run: Path, record: dict, step: int) -> None:
    """One record of the run's log (``metrics.jsonl``, `llmrec.run.append_metrics`), the console and the tracker."""
    if accelerator.is_main_process:
        append_metrics(run, record)
        logger.info(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        )
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)


def save_run_config(accelerator: Accelerator, output_dir: str | Path, *configs) -> None:
    """Record every knob of a run (``run_config.json``, `llmrec.run.write_run_config`) so that it can be
    repeated and evaluated later."""
    if accelerator.is_main_process:
        write_run_config(output_dir, *configs)
