"""The checkpoint format: ``RUN/checkpoints/checkpoint_STEP/``, written and read here only.

A checkpoint is accelerate's state (optimizer, scheduler, RNG, dataloader position) with the model's
trainable weights only (``model.safetensors`` from `CLLM4Rec.trainable_state_dict`, through the save and
load hooks of :func:`register_trainable_checkpointing`; FSDP and DeepSpeed write their own sharded model
state instead), plus ``trainer_state.json``: the loop's state (step, epoch, best metric, patience) and the
size and sha256 of every other file. It is written as ``.checkpoint_STEP.tmp`` and renamed in by
`common.artifacts.commit`, so only complete checkpoints are ever listed, loaded or rotated. Where a run's
checkpoints live is the run directory's (`llmrec.run.checkpoints_dir`); its config is the run's
``run_config.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from common.artifacts import Kind, commit, disk_error, disk_full, recover_all
from common.io import ArtifactError, file_records, verify_files, write_json
from common.log import get_logger
from llmrec.run import RunError, checkpoints_dir

logger = get_logger(__name__)
STATE_FILE = "trainer_state.json"
CHECKPOINT_KIND = Kind("checkpoint", STATE_FILE)
CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint_STEP`` directories of a run, oldest first. A checkpoint is written under a temporary
    name and renamed when complete, so these are complete; a directory without its trainer state (left
    by versions that saved in place) is not counted."""
    folder = checkpoints_dir(output_dir)
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def settle_checkpoints(accelerator: Accelerator, output_dir: str | Path) -> None:
    """Finish the renames of a save a kill interrupted (`common.artifacts.recover`: the old or the new
    checkpoint comes back complete), then remove what no complete checkpoint needs: temporary directories
    and ``checkpoint_STEP`` directories without a trainer state (saved in place by older versions).
    The main process does it, the others wait, so that every process then lists the same checkpoints."""
    folder = checkpoints_dir(output_dir)
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
    folder = checkpoints_dir(output_dir)
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
