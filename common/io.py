"""Files that are either complete or absent: atomic file writes, sha256, JSON, ArtifactError.

Every file the project writes on its own (metrics, JSON records) goes through :func:`atomic_file`, so
an interrupted write never leaves a half-written file where a reader would find it; whole directories
go through `common.artifacts`. Written with the standard library (``tempfile`` + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import UserError


class ArtifactError(UserError):
    """A file or directory that cannot be written or read as expected; the message names the path."""

    def __init__(self, message: str, *, file: str | Path | None = None):
        self.file = str(file) if file is not None else None
        self.reason = message
        super().__init__(f"{file}: {message}" if file is not None else message)


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; the result follows the umask
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
    `ArtifactError` names the first that is not. Nothing outside ``directory`` is opened: a name with
    ``..`` or an absolute one, and a link that leads out of ``directory``, are refused (`contained`)."""
    if not isinstance(records, dict):
        raise ArtifactError("'files' is not a mapping of file names", file=listed_in)
    contained(directory)
    for name, record in records.items():
        path = inside(directory, name, listed_in)
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
            raise ArtifactError(f"the record of {name!r} has no bytes and sha256", file=listed_in)
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


def inside(directory: Path, name: object, listed_in: Path) -> Path:
    """``directory / name`` for a file name read from an artefact; refused unless it is a relative path
    without ``..`` that stays inside ``directory`` once links are resolved."""
    rel = PurePosixPath(name) if isinstance(name, str) else None
    if rel is None or not rel.parts or rel.is_absolute() or ".." in rel.parts or "\\" in str(name):
        raise ArtifactError(
            f"lists {str(name)[:80]!r}, not a relative path inside the directory", file=listed_in
        )
    path = directory / rel
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ArtifactError(f"a link that leads outside {directory}: refused", file=path)
    return path


def contained(directory: Path) -> None:
    """Refuse a directory holding a symbolic link that resolves outside it (a reader would follow it)."""
    root = directory.resolve()
    for path in directory.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ArtifactError(f"a link that leads outside {directory}: refused", file=path)
