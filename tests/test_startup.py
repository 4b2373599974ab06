"""Start-up: ``import llmrec`` and a recipe's ``--help`` or argument error load none of the heavy stack.

Checks which modules are imported (in a fresh interpreter), not wall time, so it holds on a busy machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "peft",
    "accelerate",
    "datasets",
    "pandas",
    "safetensors.torch",
    "transformers.modeling_utils",
)

PROBE = """
import json, runpy, sys
sys.argv = [{script!r}, *{argv!r}]
code = 0
try:
    runpy.run_path({script!r}, run_name="__main__") if {script!r} else __import__("llmrec")
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(script: str, *argv: str) -> dict:
    code = PROBE.format(script=script, argv=list(argv), heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_llmrec_is_light():
    assert probe("") == {"code": 0, "heavy": []}


# every recipe with a flag of its own that a bad value fails (an int, a float or a bool of one of its configs)
BAD_VALUES = {
    "pretrain": ["--lora_r", "many"],
    "finetune": ["--lora_r", "many"],
    "evaluate": ["--batch_size", "many"],
    "export": ["--merge", "many"],
    "recommend": ["-k", "many"],
    "index": ["--method", "collaborative", "--n_clusters", "many"],
    "baselines": ["--sasrec_epochs", "many"],
    "zeroshot": ["--max_history", "many"],
    "align": ["--beta", "many"],
    "serve": ["--port", "many"],
}
CALLS = [(recipe, ["--help"], 0) for recipe in BAD_VALUES] + [
    (recipe, argv, 2) for recipe, argv in BAD_VALUES.items()
]


def test_every_recipe_is_probed():
    assert sorted(BAD_VALUES) == sorted(path.stem for path in (REPO / "recipes").glob("*.py"))


@pytest.mark.parametrize("recipe, argv, code", CALLS)
def test_recipe_help_and_argument_errors_load_no_model_stack(recipe, argv, code):
    assert probe(str(REPO / "recipes" / f"{recipe}.py"), *argv) == {"code": code, "heavy": []}


def test_index_method_help_loads_no_model_stack():
    """``index.py --method M --help`` lists that indexer's config, still without the model stack."""
    assert probe(str(REPO / "recipes" / "index.py"), "--method", "rqvae", "--help") == {
        "code": 0,
        "heavy": [],
    }


def test_every_benchmark_script_imports():
    """The benchmarks are scripts no other test runs; importing each (one interpreter for all) catches a
    helper that moved or was renamed under them."""
    loader = (
        "import importlib.util, pathlib\n"
        "for path in sorted(pathlib.Path('benchmarks').glob('*.py')):\n"
        "    spec = importlib.util.spec_from_file_location('benchmark_' + path.stem, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", loader], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
