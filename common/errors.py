"""Errors a user can fix, and the one way every command line reports them.

:class:`UserError` is the common base of every "bad input" error (a bad data file, config value,
dataset or recommender bundle, checkpoint, artefact): :func:`run_cli` prints it as one line on stderr
and exits with code 2. Anything else is a bug and keeps its traceback. ``--debug`` on the command
line or ``LLMREC_DEBUG=1`` shows the traceback of user errors too. It lives in ``common`` because
both ``python -m data_prep`` and the recipes use it.
"""

from __future__ import annotations

import os
import reprlib
import sys
from collections.abc import Callable
from pathlib import Path

USER_ERROR_EXIT = 2
# the longest message an error prints: a value quoted in it (a YAML alias bomb expands to megabytes)
# is cut in the middle, so the start (what is wrong, where) and the end (what to do) stay
MAX_MESSAGE = 2000


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 8, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 200, 200, 60


def shown(value: object) -> str:
    """``repr(value)`` for an error message, bounded without expanding it: a YAML alias bomb is a list
    whose full repr has billions of elements (`reprlib` stops at 2 levels and 8 entries per level)."""
    return _SHORT.repr(value)


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut in the middle to at most about ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[: limit - tail]} [... {len(text) - limit} characters cut ...] {text[-tail:]}"


class UserError(ValueError):
    """Input that the user has to fix: the message says what is wrong, where, and what to do.

    The message is bounded (:func:`bounded`), however long the values it quotes."""

    def __init__(self, *args: object):
        super().__init__(*(bounded(arg) if isinstance(arg, str) else arg for arg in args))


class NotFoundError(UserError):
    """A raw id (user, item) that the catalogue does not hold; a service answers it with 404."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (how a command line or a service reports it)."""
    return " ".join(str(err).split()) or type(err).__name__


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` among the arguments or ``LLMREC_DEBUG`` set to anything but ``""``/``0``."""
    return "--debug" in argv or os.environ.get("LLMREC_DEBUG", "") not in ("", "0")


def run_cli(
    main: Callable[[list[str]], object], argv: list[str] | None = None, prog: str | None = None
) -> int:
    """Run an entry point ``main(argv)`` under the exit-code policy and return the exit code.

    0: done. 2: a :class:`UserError` (one line ``PROG: error: MESSAGE`` on stderr; ``--debug`` or
    ``LLMREC_DEBUG=1`` re-raises it with its traceback). Other exceptions propagate (a bug: Python
    prints the traceback and exits 1). ``--debug`` is removed before ``main`` sees the arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    prog = prog or Path(sys.argv[0]).name
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {bounded(one_line(err))} (--debug for the traceback)\n")
        return USER_ERROR_EXIT
    return 0
