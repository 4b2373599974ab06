"""Files that are either complete or absent: atomic directory and file writes, sha256, JSON.

Every artefact the project writes (dataset bundles, run directories, indexes, exports, metrics) goes
through here, so an interrupted write never leaves a half-written file where a reader would find it.
Written with the standard library only (``tempfile`` + ``os.replace``); no ecosystem package offers an
atomic *directory* rename with rollback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ArtifactError(ValueError):
    """A file or directory that cannot be written or read as expected; the message names the path."""

    def __init__(self, message: str, *, file: str | Path | None = None):
        self.file = str(file) if file is not None else None
        self.reason = message
        super().__init__(f"{file}: {message}" if file is not None else message)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` and rename it to ``out`` only if the block succeeds,
    so a failed write never leaves a half-written directory (or clobbers a good one)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError("output directory already exists (use --overwrite to replace it)", file=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """Write ``value`` as indented JSON (plus a newline) atomically; ``dumps`` go to ``json.dumps``."""
    return write_text(path, json.dumps(value, indent=2, **dumps) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or invalid file is an `ArtifactError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtifactError(f"{what} missing", file=path) from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{what} is not valid JSON ({err})", file=path) from err


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
