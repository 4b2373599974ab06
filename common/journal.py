"""An append-only JSON-lines journal whose every acknowledged record survives a crash.

A service appends one record per change it accepts and calls :meth:`Journal.append` *before* it
acknowledges the change: the line is written and ``fsync``'d, so a ``SIGKILL`` or power loss right after
the acknowledgement loses nothing. On start the records are read back and replayed. Only the last line
can be torn (a crash mid-write, never acknowledged): it is dropped with a warning and cut off the file;
a bad line anywhere else is a damaged journal, named with its line number. The first line is a header
that ties the journal to the artefact it changes (e.g. a bundle's checksum), so that a journal is never
replayed onto another one. Standard library only: the ecosystem's write-ahead logs (SQLite, LMDB) bring
a database for what is one file of appended lines.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from common.io import ArtifactError

logger = logging.getLogger(__name__)

JOURNAL_FORMAT = "llmrec-journal"


class Journal:
    """``Journal(path, owner)``: open (or create) the journal of the artefact identified by ``owner``.

    :attr:`records` holds the records found at open, oldest first; :meth:`append` adds one durably.
    """

    def __init__(self, path: str | Path, owner: str):
        self.path, self.owner = Path(path), owner
        self._lock = threading.Lock()
        self.records = self._read() if self.path.exists() else []
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write_line({"format": JOURNAL_FORMAT, "owner": owner})

    def _read(self) -> list[dict[str, Any]]:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # a file of whole records ends with a newline
        if tail:
            logger.warning(
                "%s: dropping a torn last record (%d bytes, never acknowledged)", self.path, len(tail)
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(len(raw) - len(tail))
                os.fsync(handle.fileno())
        records = []
        for number, line in enumerate(complete, 1):
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ArtifactError(
                    f"line {number}: not a JSON record ({err}); damaged journal", file=self.path
                ) from err
            if not isinstance(record, dict):
                raise ArtifactError(f"line {number}: a record must be a JSON object", file=self.path)
            records.append(record)
        if not records:
            return []
        header = records[0]
        if header.get("format") != JOURNAL_FORMAT:
            raise ArtifactError(f"line 1: not a {JOURNAL_FORMAT} header", file=self.path)
        if header.get("owner") != self.owner:
            raise ArtifactError(
                f"line 1: the journal belongs to {header.get('owner')!r}, not to {self.owner!r} "
                "(another bundle); move it away or point to that bundle's journal",
                file=self.path,
            )
        return records[1:]

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and fsync it; return only once it is on disk."""
        with self._lock:
            self._write_line(record)
            self.records.append(record)

    def _write_line(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
