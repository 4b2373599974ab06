"""One config system: dataclasses, a YAML experiment file nested by component, CLI overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from llmrec.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Recipe:
    section: ClassVar[str] = "pretrain"
    data: str = "data/x"
    corpora: str = "collaborative"


@dataclass
class Other:
    section: ClassVar[str] = "finetune"
    data: str = "data/x"
    init: str | None = None


@dataclass
class Train:
    section: ClassVar[str] = "train"
    epochs: int = 1
    batch_size: int = 8
    tags: str | None = field(default=None, metadata={"help": "comma-separated"})


EXPERIMENT = """
data: data/ml
train: {epochs: 3, batch_size: 16}
pretrain:
  corpora: content
  train: {epochs: 5}
finetune:
  init: runs/p
  train: {epochs: 9}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_component_section_recipe_override_and_cli_in_that_order(tmp_path):
    path = write(tmp_path, EXPERIMENT)
    recipe, train = parse_config(Recipe, Train, args=["--config", path])
    assert (recipe.data, recipe.corpora, train.epochs, train.batch_size) == ("data/ml", "content", 5, 16)
    _, train = parse_config(Recipe, Train, args=["--config", path, "--epochs", "7"])
    assert train.epochs == 7
    other, train = parse_config(Other, Train, args=["--config", path])
    assert (other.init, train.epochs, train.batch_size) == ("runs/p", 9, 16)
    assert parse_config(Recipe, Train, args=[])[1].epochs == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pretrain:\n  epohcs: 5\n", r"exp.yaml: unknown field\(s\) \['epohcs'\] in section 'pretrain'"),
        ("train:\n  corpora: x\n", r"unknown field\(s\) \['corpora'\] in section 'train' \(Train\)"),
        ("pretrain:\n  train: {init: x}\n", r"unknown field\(s\) \['init'\] in section 'pretrain.train'"),
        ("epochs: 3\n", r"top-level key\(s\) \['epochs'\] outside a section.*move epochs -> train:"),
        ("train: 3\n", r"section 'train' must be a mapping"),
    ],
    ids=["typo", "wrong-section", "wrong-nested-section", "flat-0.1-format", "scalar-section"],
)
def test_every_key_reaches_one_dataclass_or_is_an_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Recipe, Train, args=["--config", write(tmp_path, text)])


def test_a_field_two_dataclasses_share_has_a_dotted_flag_each_and_the_flat_one_reaches_the_first(tmp_path):
    @dataclass
    class Clash:
        section: ClassVar[str] = "clash"
        epochs: int = 2
        former: ClassVar[dict[str, str]] = {"clash_epochs": "clash.epochs"}

    types = (Recipe, Train, Clash)
    _, train, clash = parse_config(*types, args=["--epochs", "3", "--clash.epochs", "4"])
    assert (train.epochs, clash.epochs) == (3, 4)
    _, train, clash = parse_config(*types, args=["--pretrain.train.epochs", "5", "--clash_epochs=6"])
    assert (train.epochs, clash.epochs) == (5, 6)
    path = write(tmp_path, "train: {epochs: 7}\nclash: {clash_epochs: 8}\npretrain: {clash: {epochs: 9}}\n")
    _, train, clash = parse_config(*types, args=["--config", path])
    assert (train.epochs, clash.epochs) == (7, 9)  # the recipe's nested section wins over the shared one
    _, train, _ = parse_config(*types, args=["--config", path, "--train.epochs", "1"])
    assert train.epochs == 1


def test_a_former_key_of_the_recipe_section_reaches_its_new_section(tmp_path):
    @dataclass
    class Eval:
        section: ClassVar[str] = "eval"
        batch_size: int = 64

    @dataclass
    class Moved(Recipe):
        former: ClassVar[dict[str, str]] = {"eval_batch_size": "eval.batch_size"}

    path = write(tmp_path, "pretrain: {eval_batch_size: 16, train: {batch_size: 4}}\n")
    _, train, evaluation = parse_config(Moved, Train, Eval, args=["--config", path])
    assert (train.batch_size, evaluation.batch_size) == (4, 16)
    _, train, evaluation = parse_config(
        Moved, Train, Eval, args=["--batch_size", "2", "--eval_batch_size", "3"]
    )
    assert (train.batch_size, evaluation.batch_size) == (2, 3)


def test_the_flag_spellings_of_earlier_versions_still_work():
    @dataclass
    class Switches:
        section: ClassVar[str] = "switches"
        with_content: bool = True
        hidden_dims: list[int] = field(default_factory=lambda: [4])

    types = (Recipe, Train, Switches)
    _, train, switches = parse_config(
        *types, args=["--batch-size", "3", "--no_with_content", "--hidden-dims", "2", "1"]
    )
    assert (train.batch_size, switches.with_content, switches.hidden_dims) == (3, False, [2, 1])
    _, train, switches = parse_config(
        *types, args=["--train.batch-size=5", "--switches.with_content", "false"]
    )
    assert (train.batch_size, switches.with_content) == (5, False)
    assert parse_config(*types, args=["--with_content"])[2].with_content is True


def test_bad_yaml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(Recipe, args=["--config", write(tmp_path, "data: [unclosed\n")])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(Recipe, args=["--config", str(tmp_path / "nope.yaml")])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(Recipe, Train, args=["--help"])
    out = capsys.readouterr().out
    for name in ("--data", "--corpora", "--epochs", "--tags", "--config", "comma-separated"):
        assert name in out
    groups = [line for line in out.splitlines() if line.endswith("):")]
    assert groups == ["pretrain (Recipe):", "train (Train):"]
    assert "--train.epochs, --pretrain.train.epochs, --epochs EPOCHS" in out


RECIPES = (
    "pretrain",
    "finetune",
    "evaluate",
    "baselines",
    "zeroshot",
    "export",
    "recommend",
    "index",
    "align",
)


@pytest.mark.parametrize(
    "config", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_config_parses_for_the_recipes_it_has_sections_for(config, monkeypatch):
    import importlib

    import yaml

    monkeypatch.syspath_prepend(str(REPO / "recipes"))

    values = yaml.safe_load(config.read_text())
    sections = set(values)
    used = [name for name in RECIPES if name in sections]
    assert used, f"{config.name} configures no recipe"
    for name in used:
        module = importlib.import_module(name)
        parsed = parse_config(*module.CONFIGS, args=["--config", str(config)])
        assert parsed[0].data == values["data"]
        # the keys EvalConfig took over keep their values
        own = values[name]
        evaluation = [c for c in parsed if type(c).section == "eval"]
        for key in ("eval_batch_size", "metric_for_best") + (("batch_size",) if name == "evaluate" else ()):
            if key in own:
                assert getattr(evaluation[0], key.removeprefix("eval_")) == own[key]


def test_finetune_init_refuses_settings_that_the_pretraining_run_would_override(monkeypatch):
    import importlib

    from llmrec.backbone import BackboneConfig
    from llmrec.model import ModelConfig

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    check_init = importlib.import_module("finetune").check_init
    run = (BackboneConfig("smollm2-135m", num_layers=2), ModelConfig(lora_r=8))
    check_init(
        "runs/p", (BackboneConfig(), run[0]), (ModelConfig(head="untied"), run[1])
    )  # defaults, finetune knobs
    check_init(
        "runs/p", (BackboneConfig("smollm2-135m", num_layers=2), run[0]), (ModelConfig(lora_r=8), run[1])
    )
    with pytest.raises(
        ConfigError, match=r"--init runs/p .* sets num_layers=4 \(run: 2\), lora_r=32 \(run: 8\)"
    ):
        check_init("runs/p", (BackboneConfig(num_layers=4), run[0]), (ModelConfig(lora_r=32), run[1]))


def test_every_choice_literal_names_what_the_code_implements():
    from typing import get_args

    from llmrec.baselines import BASELINES
    from llmrec.options import BASELINE_NAMES, INDEX_CONFIGS, FinetuneTask, IndexMethod
    from llmrec.pipeline import FINETUNE_TASKS

    assert set(get_args(FinetuneTask)) == set(FINETUNE_TASKS)
    assert set(BASELINE_NAMES) == set(BASELINES)
    assert set(get_args(IndexMethod)) == set(INDEX_CONFIGS)


def test_a_field_without_default_is_required_on_the_command_line_or_in_the_file(tmp_path):
    from common.config import parse_dataclasses

    @dataclass
    class Build:
        input: str
        out: str
        seed: int = 0

    with pytest.raises(ConfigError, match=r"^--input, --out required"):
        parse_dataclasses(Build, args=["--seed", "1"])
    path = write(tmp_path, "input: src\n")
    assert parse_dataclasses(Build, args=["--config", path, "--out", "b"]) == (Build("src", "b"),)
