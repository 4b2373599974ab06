"""Shared fixtures. Area-specific fixtures live in the test module that needs them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (datasets and fixed benchmark splits); skip when absent."""
    if not (SHARED / "datasets" / "ml-100k").is_dir():
        pytest.skip(f"{SHARED} not found beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def ml100k_bundle(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ML-100K bundle on the fixed ml-100k-random split, built once per session (~2 s)."""
    from data_prep.build import build_ml100k_reference

    return build_ml100k_reference(shared_dir, tmp_path_factory.mktemp("bundles") / "ml-100k")


def _kill_after_checkpoint(command: list[str], run: Path, checkpoint: str) -> None:
    """Run a recipe ``command`` in a subprocess and SIGKILL it once ``run`` holds ``checkpoint``.

    The subprocess gets this process's environment (the same thread count: the same floating-point
    sums), with the checkout first on its path.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (run / "checkpoints" / checkpoint / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture
def kill_after_checkpoint():
    """``kill_after_checkpoint(command, run, "checkpoint_STEP")``: start a recipe, SIGKILL it once that
    checkpoint is complete."""
    return _kill_after_checkpoint


def recipe_main(name: str) -> Callable:
    """``main`` of ``recipes/NAME.py``, imported as a registered module (not ``runpy``), so that the
    argument parser can resolve the type hints of the recipe's own dataclasses."""
    module_name = f"recipes_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name].main


def perturb_trainable(model, scale: float = 0.1) -> None:
    """Add seeded noise to every trainable tensor (LoRA B starts at zero), so that every trained part of
    ``model`` changes its scores and a round trip that dropped one would show."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * scale
                )


STEPS = 4  # tmp -> .new, out -> .old, .new -> out, delete .old


def kill_during(out: Path, step: int, action: Callable[[], object]) -> int:
    """Run ``action`` in a child process that dies (``os._exit``) just before the ``step``-th filesystem
    step (1-based) of the replace of ``out``; returns the child's exit status (0: not killed)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            calls = [0]

            def counted(real):
                def call(*args, **kwargs):
                    names = {Path(a).name for a in args if isinstance(a, (str, Path))}
                    if any(n == out.name or n.startswith(f".{out.name}.") for n in names):
                        calls[0] += 1
                        if calls[0] == step:
                            os._exit(9)
                    return real(*args, **kwargs)

                return call

            from common import artifacts

            artifacts.os.rename = counted(os.rename)  # the child's copy of the module: dies with it
            artifacts.shutil.rmtree = counted(shutil.rmtree)
            action()
        except BaseException as err:  # noqa: BLE001 - report it, the parent fails the test
            sys.stderr.write(f"child failed: {err!r}\n")
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def tiny_generator(n_users: int, n_items: int):
    """(index, model): a random 3-level semantic-ID index (4 codes a level) and a tiny-llama generator over
    it, its code embeddings spread so that items' probabilities differ; for the generator's tests."""
    import torch

    from llmrec.backbone import BackboneConfig
    from llmrec.indexing import NumberIndexConfig, RandomIndexer
    from llmrec.indexing.base import IndexData
    from llmrec.model import CLLM4Rec, ModelConfig

    index = RandomIndexer(NumberIndexConfig(codebook_size=4, seed=1)).build(IndexData(n_items=n_items))
    model = CLLM4Rec.from_config(
        ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), n_users, n_items, item_index=index, seed=0
    )
    with torch.no_grad():
        model.collab.family_weight("semantic").mul_(20)
    return index, model.eval()
