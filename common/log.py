"""One logging format for the library and the recipes; the library itself never prints."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger once; recipes call this, the library never does."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", force=True)
