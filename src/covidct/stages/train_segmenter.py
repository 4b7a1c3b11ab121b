"""Stage train_segmenter: the Attention U-Net on the lung set's training patients' lung masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidct.segmentation.fit import fit_network


def run(params: dict[str, Any], root: Path) -> None:
    fit_network(params, root, "segmenter")
