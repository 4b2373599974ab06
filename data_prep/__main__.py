"""Command line: ``python -m data_prep build ...`` and ``python -m data_prep inspect DIR``."""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.errors import DataError

USAGE = """usage: python -m data_prep {build,inspect} ...

  build    read a source, filter, split and write a dataset bundle (see `build --help`)
  inspect  print counts, density, split sizes and example documents of a bundle
"""


def main(argv: list[str] | None = None) -> int:
    from common.config import ConfigError, parse_dataclasses
    from common.log import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("build", "inspect"):
        sys.stdout.write(USAGE) if argv and argv[0] in ("-h", "--help") else sys.stderr.write(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging()
    log = logging.getLogger("data_prep")
    try:
        if argv[0] == "build":
            from data_prep.build import BuildConfig, build

            (config,) = parse_dataclasses(BuildConfig, args=argv[1:])
            build(config)
        else:
            from data_prep.summary import summarize

            parser = argparse.ArgumentParser(prog="python -m data_prep inspect")
            parser.add_argument("bundle", help="bundle directory")
            parser.add_argument("--examples", type=int, default=3, help="example documents per corpus")
            args = parser.parse_args(argv[1:])
            sys.stdout.write(summarize(args.bundle, examples=args.examples) + "\n")
    except (DataError, ConfigError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
