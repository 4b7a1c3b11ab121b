"""Shared test fixtures: where the real data lives (``../shared/data`` beside the repo, or COVIDCT_TEST_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVIDCT_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
