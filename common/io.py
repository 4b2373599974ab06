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
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError

logger = logging.getLogger(__name__)


class ArtifactError(UserError):
    """A file or directory that cannot be written or read as expected; the message names the path."""

    def __init__(self, message: str, *, file: str | Path | None = None):
        self.file = str(file) if file is not None else None
        self.reason = message
        super().__init__(f"{file}: {message}" if file is not None else message)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Temporary siblings of ``out`` left by a killed writer (its pid is in the name and no longer runs)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)(-|$)")
    for path in out.parent.iterdir():
        found = pattern.match(path.name)
        if found and int(found.group(2)) != os.getpid() and not _alive(int(found.group(2))):
            logger.warning("removing %s, left behind by an interrupted write", path)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` and rename it to ``out`` only if the block succeeds,
    so a failed write never leaves a half-written directory (or clobbers a good one).

    ``overwrite`` replaces an existing directory, but only one holding ``marker`` (the file that makes
    it an artefact of this kind) when one is given, so a mistyped ``--out`` cannot delete unrelated
    data. Temporary siblings left by a killed writer are removed first; the result gets the umask.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError("output path is an existing file, not a directory; choose another", file=out)
    if out.exists() and not overwrite:
        raise ArtifactError("output directory already exists (use --overwrite to replace it)", file=out)
    if out.exists() and marker and not (out / marker).is_file() and any(out.iterdir()):
        raise ArtifactError(
            f"output directory is not empty and holds no {marker}: not written by llmrec, so "
            "--overwrite will not replace it; choose another output directory",
            file=out,
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as err:  # no permission, a read-only file system, a parent that is a file
        raise ArtifactError(f"cannot write the output directory: {err.strerror}", file=out) from err
    try:
        tmp.chmod(0o777 & ~_umask())
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


def file_records(directory: Path, exclude: str | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {bytes, sha256}}`` of every file under ``directory`` (but ``exclude``, the file
    that will hold the records)."""
    return {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != exclude
    }


def verify_files(
    directory: Path, records: dict[str, dict[str, Any]], listed_in: Path, hashes: bool = True
) -> None:
    """Every recorded file is present with its recorded size and (with ``hashes``) sha256; an
    `ArtifactError` names the first that is not."""
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"missing (listed in {listed_in.name}): incomplete", file=path)
        if path.stat().st_size != record["bytes"]:
            raise ArtifactError(
                f"{path.stat().st_size} bytes, {listed_in.name} records {record['bytes']}: truncated or replaced",
                file=path,
            )
        if hashes and sha256_file(path) != record["sha256"]:
            raise ArtifactError(
                f"content differs from the sha256 in {listed_in.name}: corrupted or edited", file=path
            )
