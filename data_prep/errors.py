"""The data pipeline's input error; `UserError` and `run_cli` live in `common.errors`."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError, run_cli

__all__ = ["DataError", "UserError", "run_cli"]


class DataError(UserError):
    """Input that cannot be turned into a bundle.

    ``line`` is the 1-based physical line of a text file (the header is line 1) or the 1-based row
    of a Parquet file; ``field`` is the column or JSON key at fault. Either may be ``None`` when the
    problem is the whole file (e.g. it is empty).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
