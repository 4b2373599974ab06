"""Where a number came from: the machine and software versions that benchmarks and reports record."""

from __future__ import annotations

import os
import platform
import sys

import torch


def machine_info() -> dict[str, object]:
    """Platform, CPU count, Python/torch/transformers versions and the accelerator, if any."""
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
