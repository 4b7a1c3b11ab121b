"""Log the two-stage pipeline as one MLflow model and register it as a new version of the
project's model, tagged with what a reviewer needs before promoting it: the classifier variant,
the params, the dataset hashes from dvc.lock, the git commit, validation and test metrics."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

import covidct
from covidct.atomic import atomic_dir
from covidct.config import CropConfig, GateConfig
from covidct.registry.pipeline_model import ARTIFACTS, IMAGE, NAME, SIGNATURE, settings
from covidct.registry.promote import VARIANT_TAG
from covidct.tracking import flatten, git_commit

#: Distributions the model's code imports, pinned to the versions that trained it.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "monai",
    "mlflow",
    "albumentations",
    "opencv-python-headless",
    "pillow",
    "pydicom",
    "python-gdcm",  # compressed DICOM (JPEG Lossless, JPEG-LS, JPEG 2000)
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "pyyaml",
    "tqdm",
)


def requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def dataset_hashes(root: Path) -> dict[str, str]:
    """The md5 DVC recorded for each source dataset of ``prepare_data`` (``{}`` outside DVC)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("prepare_data", {})
    return {Path(dep["path"]).name: dep["md5"] for dep in stage.get("deps", []) if dep.get("md5", "").endswith(".dir")}


def version_tags(
    root: Path, params: Mapping[str, Any], metrics: Mapping[str, Any], variant: str, sources: Mapping[str, Any]
) -> dict[str, str]:
    """Flat string tags: MLflow's registry UI shows and searches them. ``sources``: the
    evaluate_sources stage's figures per source (``source.<name>.held_out`` is 1 for a source
    the classifier never trained on)."""
    tags = {
        VARIANT_TAG: variant,
        "covidct.git_commit": git_commit(root),
        "covidct.threshold": f"{metrics['threshold']:.6g}",
    }
    tags |= {f"data.{name}.md5": md5 for name, md5 in dataset_hashes(root).items()}
    tags |= {f"val.{k}": f"{v:.6g}" for k, v in metrics["val"].items()}
    tags |= {f"test.{k}": f"{v:.6g}" for k, v in metrics["test"].items()}
    tags |= {f"source.{name}.{k}": f"{v:.6g}" for name, figures in sources.items() for k, v in figures.items()}
    tags |= {f"param.{k}": str(v) for k, v in flatten(params).items()}
    return tags


def model_kwargs(
    segmenter: Path,
    classifier: Path,
    crop: CropConfig,
    threshold: float,
    gate: GateConfig,
    example: tuple[str, bytes],
    workdir: Path,
    study_top_k: int = 0,
    study_threshold: float | None = None,
) -> dict[str, Any]:
    """Arguments shared by ``save_model`` and ``log_model``, so the local copy and the
    registered one are built the same way."""
    settings_file = workdir / "settings.json"
    settings_file.write_text(json.dumps(settings(crop, threshold, gate, study_top_k, study_threshold), indent=2))
    return {
        "python_model": str(Path(__file__).with_name("model_code.py")),  # no pickle in the model
        "artifacts": dict(zip(ARTIFACTS, (str(segmenter), str(classifier), str(settings_file)), strict=True)),
        "code_paths": [str(Path(covidct.__file__).parent)],  # the model runs with the code that trained it
        "signature": SIGNATURE,
        "input_example": pd.DataFrame({IMAGE: [example[1]], NAME: [example[0]]}),
        "pip_requirements": requirements(),
    }


def save_pipeline(out: Path, kwargs: Mapping[str, Any]) -> None:
    """The model directory at ``out`` (``mlflow models serve -m out`` serves it), replaced whole."""
    with atomic_dir(out) as tmp:
        mlflow.pyfunc.save_model(path=str(tmp), **kwargs)


def register_pipeline(model_name: str, kwargs: Mapping[str, Any], tags: Mapping[str, str]) -> ModelVersion:
    """Log the model to the active run and register it as a new version of ``model_name``."""
    info = mlflow.pyfunc.log_model(name="pipeline", registered_model_name=model_name, **kwargs)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.update_model_version(
        model_name,
        version,
        f"{tags[VARIANT_TAG]} on lung crops; threshold {tags['covidct.threshold']}; val AUC {tags.get('val.auc', '?')}, val recall {tags.get('val.recall', '?')}",
    )
    return client.get_model_version(model_name, version)


def build_and_register(
    root: Path,
    out: Path,
    model_name: str,
    files: tuple[Path, Path],
    crop: CropConfig,
    gate: GateConfig,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    example: tuple[str, bytes],
    sources: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Save the pipeline to ``out`` and register the same model; ``metrics`` is the evaluate
    stage's entry for the cropped variant (threshold, val and test metrics), ``sources`` the
    evaluate_sources stage's figures."""
    with tempfile.TemporaryDirectory() as workdir:
        studies = (sources or {}).get(
            "cc-ccii.studies", {}
        )  # aggregation and threshold chosen on CC-CCII's validation scans
        top_k, study_threshold = int(studies.get("top_k", 0)), studies.get("threshold")
        kwargs = model_kwargs(
            *files, crop, float(metrics["threshold"]), gate, example, Path(workdir), top_k, study_threshold
        )
        save_pipeline(out, kwargs)
        variant = str(params["classifier"]["model"])
        return register_pipeline(model_name, kwargs, version_tags(root, params, metrics, variant, sources or {}))
