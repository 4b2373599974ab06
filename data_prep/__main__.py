"""Command line: ``python -m data_prep build ...`` and ``python -m data_prep inspect DIR``."""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import run_cli

USAGE = """usage: python -m data_prep {build,inspect} ...

  build    read a source, filter, split and write a dataset bundle (see `build --help`)
  inspect  print counts, density, split sizes and example documents of a bundle
"""


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; the exit code follows :func:`data_prep.errors.run_cli` (2: bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("build", "inspect"):
        sys.stdout.write(USAGE) if argv and argv[0] in ("-h", "--help") else sys.stderr.write(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return run_cli(_COMMANDS[argv[0]], argv[1:], prog=f"python -m data_prep {argv[0]}")


def _build(argv: list[str]) -> None:
    from common.config import parse_dataclasses
    from common.log import setup_logging
    from data_prep.build import BuildConfig, build

    setup_logging()
    (config,) = parse_dataclasses(BuildConfig, args=argv)
    build(config)


def _inspect(argv: list[str]) -> None:
    from data_prep.summary import summarize

    parser = argparse.ArgumentParser(prog="python -m data_prep inspect")
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--examples", type=int, default=3, help="example documents per corpus")
    args = parser.parse_args(argv)
    sys.stdout.write(summarize(args.bundle, examples=args.examples) + "\n")


_COMMANDS = {"build": _build, "inspect": _inspect}


if __name__ == "__main__":
    sys.exit(main())
