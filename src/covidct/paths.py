"""The repository's layout in one place, relative to the repo root: stages, sweeps, levers and the
registry build their paths from here, and ``dvc.yaml`` names the same ones. A stage imports this,
never another stage, so its import closure (and its ``deps``, checked by tests/test_dvc_graph.py)
holds only the code it runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

RAW = Path("data/raw")  # verified copies of the datasets, one folder per source
SPLITS = Path("data/splits")
COVID_CT_SPLIT = SPLITS / "covid_ct.csv"
LUNG_SPLIT = SPLITS / "lung_seg.csv"
CC_CCII_SPLIT = SPLITS / "cc_ccii.csv"
CROPS = Path(
    "data/crops"
)  # images/, masks/ (whole image) and lung/ (the crop's), one PNG per image; CC-CCII under cc-ccii/

SEGMENTER = Path("models/segmenter/model.safetensors")
LESION = Path("models/lesion/model.safetensors")  # the lesion segmenter (issue 27)
PIPELINE = Path("models/pipeline")  # the registered MLflow model, saved locally

REPORTS = Path("reports")
METRICS = REPORTS / "metrics.json"  # the evaluate stage's, thresholds included
AUDIT_REPORTS = REPORTS / "audit"
SEGMENTER_REPORTS = REPORTS / "segmenter"
LESION_REPORTS = REPORTS / "lesion"
CROP_REPORTS = REPORTS / "crop"
SOURCE_REPORTS = REPORTS / "sources"
SWEEP_REPORTS = REPORTS / "sweeps"  # one folder per Optuna study: its journal, trials and plots
CONFIRMATIONS = SWEEP_REPORTS / "confirmations"  # `covidct sweep-confirm`; register_model tags versions from them

#: The paper's Table 1 ablation: the classifier on lung crops, and on the whole images.
VARIANTS = ("cropped", "raw")


def raw(source: str) -> Path:
    return RAW / source


def classifier_dir(variant: str) -> Path:
    return Path(f"models/classifier_{variant}")


def crop_relpath(relpath: str, source: str = "covid-ct") -> str:
    """Crops are lossless PNG whatever the source format (stems are unique per class folder);
    COVID-CT's keep their class folders at the top, other sources sit in a folder of their own."""
    path = Path(relpath).with_suffix(".png")
    return str(path if source == "covid-ct" else Path(source) / path)


def classifier_inputs(
    root: Path, relpaths: Iterable[str], variant: str, source: str = "covid-ct", crops: Path = CROPS
) -> list[Path]:
    """Where the classifier of ``variant`` reads each image of ``source`` (``crops``: the crop
    stage's folder, or a sweep trial's crops at another margin)."""
    if variant == "cropped":
        return [root / crops / "images" / crop_relpath(p, source) for p in relpaths]
    return [root / RAW / source / p for p in relpaths]


def lung_masks(root: Path, relpaths: Iterable[str], source: str = "covid-ct", crops: Path = CROPS) -> list[Path]:
    """The lung mask of each crop, aligned with it pixel for pixel."""
    return [root / crops / "lung" / crop_relpath(p, source) for p in relpaths]
