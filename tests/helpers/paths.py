"""Where the tests find the repository and the real data (``../shared/data`` beside the repo, or
``COVIDCT_TEST_DATA``). A module that reads the data says so with ``pytest.mark.data``; without
the data those tests skip with the reason and the rest still run."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("COVIDCT_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
