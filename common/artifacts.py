"""The one guarded writer of artefact directories: what a command may replace, when, and how.

Every directory llmrec writes as a whole (dataset bundle, item index, run model, checkpoint, export and
extended recommender bundle) goes through :func:`write_directory`, and a run directory through
:func:`check_inputs`, :func:`check_owned` and :func:`hold_lock`. The rules, in order:

1. **Inputs are never outputs.** An output that is, contains or lies inside an input of the same command
   (``--data``, ``--init``, ``--run``, ``--input``...) is refused before any work.
2. **Only our own kind is replaced.** An existing output is replaced only with the overwrite flag and
   only when it carries the kind's marker (``Kind.marker``, e.g. a dataset bundle's ``manifest.json``);
   otherwise the error names the missing marker. An empty directory counts as free.
3. **One writer per target.** A lock (``flock`` on ``.NAME.lock`` beside the target) makes a second
   writer fail at once with a one-line error; the kernel drops it when its process dies.
4. **Write beside, rename in, delete last.** The content is written into ``.NAME.tmp-PID-*``; when
   complete it gets the umask's permissions and becomes ``.NAME.new-PID``; the old directory moves
   aside to ``.NAME.old-PID``; the new one is renamed to ``NAME``; only then is the old one deleted.
   A failure during the renames puts the old one back. After a kill between any two steps,
   :func:`recover` (run by the next writer and by readers) renames a complete ``new`` (else the
   ``old``) back to ``NAME`` and removes what is left, so the old or the new content is always
   complete and loadable.

Written with the standard library (``os.rename``, ``fcntl.flock``): no ecosystem package offers a
directory replace with this recovery, and accelerate's ``save_state``/transformers' ``save_pretrained``
write in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.io import ArtifactError, umask

logger = logging.getLogger(__name__)

# errors of a full disk or a file size limit (``ulimit -f``): reported as one line, not a traceback
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class Kind:
    """An artefact kind: its name in messages, the marker file that makes a directory one of ours,
    optionally the ``"format"`` that marker (a JSON object) must name when a marker file's name alone does
    not tell (an export bundle's ``config.json``, not any model's), and the flag that allows replacing one."""

    name: str
    marker: str
    flag: str = "--overwrite"
    marker_format: str | None = None

    def owns(self, directory: Path) -> bool:
        marker = directory / self.marker
        return marker.is_file() and (self.marker_format is None or _json_format(marker) == self.marker_format)


def _json_format(path: Path) -> object:
    """The ``"format"`` of a JSON object file; None when it is unreadable or not one."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def _siblings(out: Path, states: str = "tmp|new|old") -> list[tuple[Path, str, int]]:
    """``(path, state, pid)`` of the temporary siblings of ``out`` written by replaces of it."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({states})-(\d+)(-.*)?$")
    if not out.parent.is_dir():
        return []
    found = [(path, pattern.match(path.name)) for path in out.parent.iterdir()]
    return [(path, m.group(1), int(m.group(2))) for path, m in found if m]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(
        missing_ok=True
    )


class Lock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``target``; the file records the pid.

    The kernel releases it when the process dies, so a killed writer never blocks the next one.
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.fd: int | None = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False when another process holds it (with ``blocking=False``)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            # a holder that released it may have unlinked the file meanwhile: lock the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return True
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            taken = self.acquire()
        except OSError as err:
            raise ArtifactError(
                f"cannot write the output directory (its lock {self.path.name}): {err.strerror}",
                file=self.target,
            ) from err
        if not taken:
            raise ArtifactError(
                f"another process (pid {self.holder()}) is writing it now; wait for it to finish "
                "or choose another output",
                file=self.target,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, Lock] = {}


def hold_lock(target: str | Path) -> None:
    """Take ``target``'s lock until :func:`release_lock` or the end of this process (a training run holds
    its output directory); taking it again in the same process is a no-op."""
    key = Path(target).absolute()
    if key not in _HELD:
        _HELD[key] = Lock(target).__enter__()


def release_lock(target: str | Path) -> None:
    """Release a lock taken by :func:`hold_lock` (nothing when it is not held)."""
    lock = _HELD.pop(Path(target).absolute(), None)
    if lock is not None:
        lock.release()


def recover_all(folder: str | Path) -> None:
    """:func:`recover` every target in ``folder`` that an interrupted replace left siblings of."""
    pattern = re.compile(r"^\.(.+)\.(tmp|new|old)-\d+(-.*)?$")
    folder = Path(folder)
    names = {m.group(1) for m in map(pattern.match, os.listdir(folder)) if m} if folder.is_dir() else set()
    for name in sorted(names):
        recover(folder / name)


def recover(out: str | Path, *, lock: bool = True) -> None:
    """Finish or undo a replace of ``out`` that a killed process left between two steps.

    With ``out`` missing, a complete ``.NAME.new-PID`` (else the ``.NAME.old-PID``) is renamed back to
    ``out``; then every sibling left by a dead process is removed. Siblings of a live process are left
    alone (it is still writing). Readers call this too: it does nothing when there is nothing to do, and
    it gives up quietly where the directory is read-only or another process holds the lock.
    """
    out = Path(out)
    dead = [(path, state) for path, state, pid in _siblings(out) if pid != os.getpid() and not _alive(pid)]
    if not dead:
        return
    guard = Lock(out) if lock else None
    try:
        if guard is not None and not guard.acquire():
            return
        try:
            if not out.exists():
                for state in ("new", "old"):
                    found = sorted((p for p, s in dead if s == state), key=lambda p: p.stat().st_mtime)
                    if found:
                        logger.warning("restoring %s from %s, left by an interrupted write", out, found[-1])
                        os.rename(found[-1], out)
                        break
            for path, _ in dead:
                if path.exists() or path.is_symlink():
                    logger.warning("removing %s, left behind by an interrupted write", path)
                    _remove(path)
        finally:
            if guard is not None:
                guard.release()
    except OSError as err:  # a read-only place: readers still read what is there
        logger.debug("cannot recover %s: %s", out, err)


def check_inputs(
    out: str | Path, inputs: Mapping[str, str | Path | None], kind: Kind, nested: Collection[str] = ()
) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs`` (``{"--data": path}``); an
    input named in ``nested`` may hold the output (an index's default place is inside its dataset bundle,
    whose own files the marker check still protects)."""
    target = Path(out).resolve()
    for flag, value in inputs.items():
        if value is None:
            continue
        source = Path(value).resolve()
        inside = source in target.parents and flag not in nested
        if target == source or target in source.parents or inside:
            relation = "is" if target == source else "contains" if target in source.parents else "lies inside"
            raise ArtifactError(
                f"the output {relation} the {flag} {str(value)!r}; writing the {kind.name} there would "
                "destroy that input. Choose an output outside the inputs",
                file=out,
            )


def check_owned(out: str | Path, kind: Kind, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` is given and it is a ``kind`` (has its marker)."""
    out = Path(out)
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise ArtifactError(f"output path is an existing file or link, not a {kind.name} directory", file=out)
    if not out.exists() or not any(out.iterdir()):
        return
    if not kind.owns(out):
        raise ArtifactError(
            f"output directory is not empty and holds no {kind.marker} of a {kind.name}: not written by "
            f"llmrec, so {kind.flag} will not replace it; choose another output directory",
            file=out,
        )
    if not overwrite:
        raise ArtifactError(f"a {kind.name} already exists here; pass {kind.flag} to replace it", file=out)


def check_target(
    out: str | Path,
    kind: Kind,
    overwrite: bool,
    inputs: Mapping[str, str | Path | None] | None = None,
    nested: Collection[str] = (),
) -> None:
    """Every check of :func:`write_directory`, for a command to run before its long work."""
    check_inputs(out, inputs or {}, kind, nested)
    recover(out)
    check_owned(out, kind, overwrite)


def disk_full(err: BaseException) -> str | None:
    """Why ``err`` is a write that failed for want of space (``ENOSPC``/``EFBIG``/``EDQUOT``), else None.

    Python raises ``OSError``; safetensors wraps the OS error in its text ("os error 28"); torch's
    archive writer reports only the position it failed at ("unexpected pos").
    """
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return err.strerror
    text = str(err)
    for code in DISK_FULL:
        if f"os error {code})" in text:
            return os.strerror(code)
    if isinstance(err, RuntimeError) and "inline_container" in text and "unexpected pos" in text:
        return "a torch file could not be written"
    return None


def disk_error(reason: str, out: Path, kind: Kind) -> ArtifactError:
    """The one-line error of a write that failed for want of space: nothing was replaced."""
    return ArtifactError(
        f"cannot write the {kind.name}: {reason} (disk full or file size limit?); nothing was replaced, "
        "free some space and run again",
        file=out,
    )


def follow_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the umask's permissions (0644/0755 under umask 022):
    ``tempfile`` and safetensors create files readable by their owner only (0600)."""
    mask = umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def commit(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the complete directory ``tmp``: tmp -> .new, out -> .old, .new -> out, delete
    .old. A failure in between puts the old content back (a kill is undone by :func:`recover`)."""
    new = out.with_name(f".{out.name}.new-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    follow_umask(tmp)
    os.rename(tmp, new)
    try:
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.rename(old, out)
        _remove(new)
        raise
    if old.exists():
        try:
            shutil.rmtree(old)
        except OSError as err:  # the new content is in place: the next writer or reader removes it
            logger.warning("could not delete the replaced %s (%s)", old, err)


@contextlib.contextmanager
def write_directory(
    out: str | Path,
    kind: Kind,
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | Path | None] | None = None,
    nested: Collection[str] = (),
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; when the block succeeds it replaces ``out`` (rules 1-4
    of the module docstring). A failed block leaves ``out`` as it was and no temporary directory."""
    out = Path(out)
    check_inputs(out, inputs or {}, kind, nested)
    with Lock(out):
        recover(out, lock=False)
        check_owned(out, kind, overwrite)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as err:  # no permission, a read-only file system
            raise ArtifactError(f"cannot write the output directory: {err.strerror}", file=out) from err
        try:
            yield tmp
            commit(tmp, out)
        except Exception as err:
            reason = disk_full(err)
            if reason is not None:
                raise disk_error(reason, out, kind) from err
            raise
        finally:
            _remove(tmp)
