"""The recipes' logging setup drops the dependency noise a user cannot act on, and nothing else."""

from __future__ import annotations

import logging
import warnings

from common.log import setup_logging


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_setup_logging_drops_the_known_noise_and_keeps_real_warnings():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logger, collect = logging.getLogger("bitsandbytes.backends.cpu.ops"), Collect()
    logger.addHandler(collect)
    try:
        setup_logging()
        setup_logging()  # twice: still one filter
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository ...")
        logger.warning("a real problem")
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1
            )
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    finally:
        logger.removeHandler(collect)
        root.handlers[:], root.level = handlers, level
    assert collect.messages == ["a real problem"] and len(logger.filters) == 1
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
