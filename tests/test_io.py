"""The I/O kernel: atomic files, sha256, JSON with errors that name the file."""

from __future__ import annotations

import hashlib
import json

import pytest

from common.io import ArtifactError, read_json, sha256_file, write_json


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "out" / "m.json", {"seed": 0})
    assert json.loads(path.read_text()) == {"seed": 0}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("common.io.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"seed": 1})
    assert json.loads(path.read_text()) == {"seed": 0}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_sha256_and_json_errors_name_the_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1_000_000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()
    with pytest.raises(ArtifactError, match=r"nope.json: run config missing"):
        read_json(tmp_path / "nope.json", "run config")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"bad.json: JSON file is not valid JSON"):
        read_json(tmp_path / "bad.json")
