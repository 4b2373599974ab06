"""Shared fixtures. Area-specific fixtures live in the test module that needs them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (datasets and fixed benchmark splits); skip when absent."""
    if not (SHARED / "datasets" / "ml-100k").is_dir():
        pytest.skip(f"{SHARED} not found beside the checkout")
    return SHARED
