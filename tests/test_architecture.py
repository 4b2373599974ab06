"""The layer order of docs/architecture.md, checked: no module imports a module of a higher layer.

Imports inside functions count too (they are still dependencies), and ``if TYPE_CHECKING:`` ones do not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("common",),
    ("data_prep",),
    (
        "llmrec.tokens",
        "llmrec.id_tables",
        "llmrec.optim",
        "llmrec.backbone",
        "llmrec.metrics",
        "llmrec.reporting",
        "llmrec.config",
        "llmrec.options",
        "llmrec.indexing",
        "llmrec.trie",
    ),
    ("llmrec.prompts", "llmrec.head", "llmrec.losses"),
    ("llmrec.model", "llmrec.run"),
    ("llmrec.scoring", "llmrec.mapper", "llmrec.decoding"),
    ("llmrec.bundle", "llmrec.plain_model"),
    ("llmrec.recommender", "llmrec.service", "llmrec.server"),
    (
        "llmrec.collate",
        "llmrec.generate",
        "llmrec.fused",
        "llmrec.textid",
        "llmrec.zeroshot",
        "llmrec.baselines",
        "llmrec.align",
        "llmrec.grpo",
        "llmrec.generator_align",
    ),
    ("llmrec.pipeline", "llmrec.coldstart"),
    ("llmrec.train", "llmrec.checkpoint", "llmrec.export", "llmrec.model_card"),
    ("llmrec",),  # the package's __init__: the public facade (``llmrec.Recommender``)
]


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific prefix naming ``module``; None outside the project."""
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (rank, len(name))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import outside ``if TYPE_CHECKING:`` blocks, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            names = [f"{base}.{alias.name}" for alias in node.names]
            # ``from pkg import module`` names the module; ``from module import name`` the module itself
            found += [(node.lineno, name if layer_of(name) != layer_of(base) else base) for name in names]
    return found


def project_modules() -> list[Path]:
    return sorted(p for package in ("common", "data_prep", "llmrec") for p in (REPO / package).rglob("*.py"))


def test_every_project_module_has_a_layer():
    assert [module_name(p) for p in project_modules() if layer_of(module_name(p)) is None] == []


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in project_modules():
        own = layer_of(module_name(path))
        for line, target in imports(path):
            rank = layer_of(target)
            if rank is not None and rank > own and module_name(path) != "llmrec":
                violations.append(f"{path.relative_to(REPO)}:{line} imports {target} (layer {rank} > {own})")
    assert not violations, "\n".join(violations)


def test_the_layer_check_sees_a_violation(tmp_path, monkeypatch):
    probe = tmp_path / "common" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from llmrec.train import train\n")
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "project_modules", lambda: [probe])
    with pytest.raises(AssertionError, match=r"common/probe.py:2 imports llmrec.train"):
        test_no_module_imports_a_higher_layer()


def fresh_modules(code: str) -> set[str]:
    """The modules loaded after running ``code`` in a new interpreter (this checkout first on the path)."""
    script = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
    ).stdout
    return set(out.split())


TRAINING_STACK = (
    "accelerate",
    "llmrec.train",
    "llmrec.collate",
    "llmrec.generate",
    "llmrec.pipeline",
    "data_prep",
)


def test_importing_the_recommender_loads_no_training_code():
    loaded = fresh_modules("from llmrec import Recommender")
    assert "llmrec.recommender" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("peft", "transformers")) == []
    assert sorted(m for m in loaded if any(m == s or m.startswith(s + ".") for s in TRAINING_STACK)) == []


def test_data_prep_imports_nothing_from_llmrec():
    loaded = fresh_modules("import data_prep, data_prep.build, data_prep.summary, data_prep.__main__")
    assert "data_prep.build" in loaded
    assert sorted(m for m in loaded if m == "llmrec" or m.startswith("llmrec.")) == []
