"""Shared test fixtures: where the real data lives (``../shared/data`` beside the repo, or COVIDCT_TEST_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVIDCT_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest's hook signature)
    """Without the real data, the tests that read it skip with the reason, and the rest still run."""
    if DATA.is_dir():
        return
    import pytest

    skip = pytest.mark.skip(reason=f"real data not found at {DATA} (set COVIDCT_TEST_DATA to ../shared/data's copy)")
    for item in items:
        module = vars(item.module)
        if module.get("DATA") is DATA or "prepare_tiny_root" in module:
            item.add_marker(skip)
