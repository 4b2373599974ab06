"""One config system: dataclasses, a YAML experiment file with per-recipe sections, CLI overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmrec.config import ConfigError, parse_config


@dataclass
class Alpha:
    data: str = "data/x"
    lr: float = 1e-3


@dataclass
class Beta:
    epochs: int = 1
    tags: str | None = field(default=None, metadata={"help": "comma-separated"})


def test_defaults_yaml_section_and_cli_override_in_that_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data: data/ml\nlr: 1.0e-2\nepochs: 3\npretrain:\n  epochs: 5\nfinetune:\n  epochs: 9\n")
    alpha, beta = parse_config(Alpha, Beta, args=["--config", str(path)], section="pretrain")
    assert (alpha.data, alpha.lr, beta.epochs) == ("data/ml", 1e-2, 5)
    alpha, beta = parse_config(Alpha, Beta, args=["--config", str(path), "--epochs", "7"], section="pretrain")
    assert beta.epochs == 7
    _, beta = parse_config(Alpha, Beta, args=["--config", str(path)], section="finetune")
    assert beta.epochs == 9
    assert parse_config(Alpha, Beta, args=[])[1].epochs == 1


def test_a_typo_in_the_recipe_section_is_an_error_naming_file_and_field(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("pretrain:\n  epohcs: 5\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*epohcs"):
        parse_config(Alpha, Beta, args=["--config", str(path)], section="pretrain")


def test_bad_yaml_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(Alpha, args=["--config", str(path)])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(Alpha, args=["--config", str(tmp_path / "nope.yaml")])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(Alpha, Beta, args=["--help"])
    out = capsys.readouterr().out
    for name in ("--data", "--lr", "--epochs", "--tags", "--config", "comma-separated"):
        assert name in out
