"""Where the input gate's thresholds come from: the picture and lung-mask evidence of every
training slice of the three sources, as the registered pipeline computes it (segmenter, cleaned
mask, body midline), summarised per source, with the share each candidate threshold would refuse.

    python scripts/gate_calibration.py            # after `dvc repro train_segmenter prepare_data`

Writes reports/gate/calibration.csv (quantiles per source), evidence_<split>.csv, evidence.png, and
lungless_control.csv: the same evidence for chest slices whose lungs were filled in (see lungless_control).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from covidct.config import CropConfig, declared_sources, load_params
from covidct.datasets import LUNG_SEG
from covidct.gate import lung_evidence
from covidct.images import read_grayscale, read_mask
from covidct.lung_crop import segment_and_crop
from covidct.paths import REPORTS, SEGMENTER
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.model import load_segmenter
from covidct.source_figures import source_table

OUT = REPORTS / "gate"
QUANTILES = (0.0, 0.001, 0.01, 0.05, 0.5)


def evidence(root: Path, split: str) -> pd.DataFrame:
    device = select_device()
    configure_threads()
    model, meta = load_segmenter(root / SEGMENTER, device)
    params = load_params(root / "params.yaml")
    crop = CropConfig.of(params)
    rows = []
    for name in [*declared_sources(params), LUNG_SEG]:
        table = source_table(root, name)
        table = table[table["split"] == split]
        for start in tqdm(range(0, len(table), crop.batch_size), desc=f"{name} {split}", unit="batch"):
            chunk = table.iloc[start : start + crop.batch_size]
            images = [read_grayscale(p) for p in chunk["path"]]
            for (_, row), image, result in zip(
                chunk.iterrows(), images, segment_and_crop(images, model, meta, crop, device), strict=True
            ):
                lungs = lung_evidence(result.mask, image)
                rows.append(
                    {
                        "source": name,
                        "relpath": row["relpath"],
                        "min_side": min(image.shape),
                        "std": float(image.std()),
                        "lung_fraction": lungs.fraction,
                        "balance": lungs.balance,
                    }
                )
    return pd.DataFrame(rows)


def lungless_control(root: Path) -> pd.DataFrame:
    """A negative control: the lung set's held-out slices with their lungs (the radiologists'
    masks) filled with the body's median soft-tissue grey, i.e. a chest slice with no lung in it,
    as a neck or abdomen slice has none. The gate should refuse them; the evidence says how clearly."""
    device = select_device()
    model, meta = load_segmenter(root / SEGMENTER, device)
    crop = CropConfig.of(load_params(root / "params.yaml"))
    table = source_table(root, "lung-seg")
    table = table[table["split"] == "test"]
    rows = []
    for start in range(0, len(table), crop.batch_size):
        chunk = table.iloc[start : start + crop.batch_size]
        images = []
        for _, row in chunk.iterrows():
            gray = read_grayscale(row["path"]).copy()
            lungs = read_mask(root / "data/raw/lung-seg" / row["mask"], gray.shape)
            body = gray[(gray > 100) & ~lungs]
            gray[lungs] = int(np.median(body)) if body.size else 128
            images.append(gray)
        for image, result in zip(images, segment_and_crop(images, model, meta, crop, device), strict=True):
            lungs = lung_evidence(result.mask, image)
            rows.append(
                {
                    "source": "lung-seg, lungs filled",
                    "min_side": min(image.shape),
                    "std": float(image.std()),
                    "lung_fraction": lungs.fraction,
                    "balance": lungs.balance,
                }
            )
    return pd.DataFrame(rows)


def main(root: Path, split: str = "train") -> None:
    table = evidence(root, split)
    summary = (
        table.groupby("source")[["min_side", "std", "lung_fraction", "balance"]].quantile(list(QUANTILES)).unstack()
    )
    OUT.mkdir(parents=True, exist_ok=True)
    summary.to_csv(root / OUT / "calibration.csv")
    table.to_csv(root / OUT / f"evidence_{split}.csv", index=False)
    fig = Figure(figsize=(10, 3.5))
    for ax, column in zip(fig.subplots(1, 3), ("std", "lung_fraction", "balance"), strict=True):
        for name, part in table.groupby("source"):
            ax.hist(part[column], bins=60, alpha=0.5, density=True, label=name)
        ax.set_title(column)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(root / OUT / "evidence.png", dpi=120)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(summary.T.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"{len(table)} {split} slices; {OUT / 'calibration.csv'}, {OUT / 'evidence.png'}")
    control = lungless_control(root)
    control.to_csv(root / OUT / "lungless_control.csv", index=False)
    print("negative control, lung-set test slices with their lungs filled:")
    print(control[["std", "lung_fraction", "balance"]].describe().T.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main(Path.cwd(), sys.argv[1] if len(sys.argv) > 1 else "train")
