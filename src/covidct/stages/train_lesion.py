"""Stage train_lesion: the same network on the lung set's training patients' infection masks
(the radiologists' lesion masks), from the lung segmenter's weights where ``lesion.init`` says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidct.segmentation.fit import fit_network


def run(params: dict[str, Any], root: Path) -> None:
    fit_network(params, root, "lesion")
