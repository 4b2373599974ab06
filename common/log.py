"""One logging format for the library and the recipes; the library itself never prints."""

from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Messages of dependencies that a user of llmrec cannot act on, each matched by its logger (or warning
# category) and the start of its text, so that every other message of those libraries still shows.
NOISE = {
    # bitsandbytes (imported by peft) looks for optional CPU kernels on the hub at import; offline, or
    # untrusted, it falls back to its own and says so on every run
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)  # read by peft when it wraps a model


class _DropNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger once and drop the dependency noise in `NOISE`/`DEPRECATIONS`; recipes
    call this, the library never does."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", force=True)
    for name, prefix in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNoise(prefix))
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
