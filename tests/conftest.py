"""Shared test fixtures: where the real data lives (``../shared/data`` beside the repo, or COVIDCT_TEST_DATA)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.servers import Postgres, running_postgres

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVIDCT_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest's hook signature)
    """Without the real data, the tests that read it skip with the reason, and the rest still run."""
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {DATA} (set COVIDCT_TEST_DATA to ../shared/data's copy)")
    for item in items:
        module = vars(item.module)
        if module.get("DATA") is DATA or "prepare_tiny_root" in module:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session; each module makes its own databases on it."""
    with running_postgres() as server:
        yield server
