"""Log the two-stage pipeline as one MLflow model and register it as a new version of the
project's model, tagged with what a reviewer needs before promoting it: the classifier variant,
the params, the dataset hashes from dvc.lock, the git commit, validation and test metrics."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model
from mlflow.tracking import MlflowClient

import covidct
from covidct.atomic import atomic_dir
from covidct.config import ConfigError, CropConfig, GateConfig, classifier_recipe, crop_settings
from covidct.paths import CONFIRMATIONS, RAW
from covidct.registry.pipeline_model import ARTIFACTS, IMAGE, NAME, SIGNATURE, settings
from covidct.registry.promote import VARIANT_TAG
from covidct.schema import dotted_keys
from covidct.tracking import flatten, git_commit
from covidct.verdicts import ALL_SLICES, TopSlices

#: What a time bound may cut from a confirmed trial and the version still name it (``sweep_tags``).
BUDGET_KEY = "epochs"
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
    """Each verified dataset under data/raw by the sha256 of its SHA256SUMS, which lists every file's
    own: the same value wherever the same data was verified, with or without DVC (``{}`` without data)."""
    lists = sorted((root / RAW).glob("*/SHA256SUMS"))
    return {path.parent.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in lists}


def holdout_tags(holdout: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, str]:
    """The leave-one-source-out figures of the lever whose recipe is ``params``' (its classifier
    section, less the sources and seed the folds vary, on crops from the same segmenter and crop
    settings), or none when the study never ran it."""
    for lever, figures in holdout.get("levers", {}).items():
        if figures.get("classifier") == classifier_recipe(params) and figures.get("crops") == crop_settings(params):
            tags = {"holdout.study": str(holdout["study"]), "holdout.lever": lever}
            tags |= {"holdout.worst_fold": figures["worst_fold"]}
            tags |= {f"holdout.{k}": f"{figures[k]:.6g}" for k in ("worst_auc", "mean_auc")}
            for fold, values in figures["folds"].items():
                tags |= {f"holdout.{fold}.{k}": f"{v:.6g}" for k, v in values.items()}
            return tags
    return {}


def _cut(key: str, held: Any, trial: Any) -> bool:
    """Fewer epochs than the trial trained: what a time bound takes, not another recipe."""
    return key.rsplit(".", 1)[-1] == BUDGET_KEY and isinstance(held, int) and isinstance(trial, int) and held < trial


def sweep_tags(confirmations: Path, params: Mapping[str, Any]) -> dict[str, str]:
    """The confirmed studies whose best trial's values are the ones in ``params``: where the
    recipe came from (``covidct sweep-confirm``, then ``sweep-best --apply``). A trial's epochs
    may be cut for the 60-minute bound and the version still names it, with ``sweep.<study>.cut``
    saying what was cut; any other value params.yaml does not hold means the recipe is not the trial's."""
    tags, flat = {}, dotted_keys(params)
    for path in sorted(confirmations.glob("*.json")):
        record = json.loads(path.read_text())
        matches = []  # a classifier study's confirmation has arms (the trial, parts of it); a segmenter's is one
        for arm, confirmed in record.get("arms", {None: record}).items():
            differs = {key: value for key, value in confirmed["overrides"].items() if flat.get(key) != value}
            if all(_cut(key, flat.get(key), value) for key, value in differs.items()):
                matches.append((len(differs), -len(confirmed["overrides"]), arm, confirmed["adopt"], differs))
        if not matches:
            continue
        _, _, arm, adopt, cut = min(matches, key=lambda match: match[:2])  # nothing cut, then the most values held
        study = record["study"]
        tags |= {f"sweep.{study}.trial": str(record["trial"]), f"sweep.{study}.adopted_on_val": str(adopt).lower()}
        tags |= {f"sweep.{study}.arm": arm} if arm else {}
        if cut:
            tags |= {
                f"sweep.{study}.cut": ", ".join(f"{key}={flat[key]} (trial: {value})" for key, value in cut.items())
            }
    return tags


def version_tags(
    root: Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    variant: str,
    sources: Mapping[str, Any],
    holdout: Mapping[str, Any] | None = None,
    lesion: Mapping[str, Any] | None = None,
    sweeps: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Flat string tags: MLflow's registry UI shows and searches them. ``sources``: the
    evaluate_sources stage's figures per source (``source.<name>.held_out`` is 1 for a source
    the classifier never trained on); ``holdout``: the leave-one-source-out study's metrics;
    ``lesion``: the evaluate_lesion stage's figures."""
    tags = {
        VARIANT_TAG: variant,
        "covidct.git_commit": git_commit(root),
        "covidct.threshold": f"{metrics['threshold']:.6g}",
    }
    tags |= {f"data.{name}.sha256sums": digest for name, digest in dataset_hashes(root).items()}
    tags |= {f"val.{k}": f"{v:.6g}" for k, v in metrics["val"].items()}
    tags |= {f"test.{k}": f"{v:.6g}" for k, v in metrics["test"].items()}
    tags |= {f"source.{name}.{k}": f"{v:.6g}" for name, figures in sources.items() for k, v in figures.items()}
    tags |= {f"param.{k}": str(v) for k, v in flatten(params).items()}
    tags |= {f"lesion.{k}": f"{v:.6g}" for k, v in (lesion or {}).items()}
    tags |= dict(sweeps or {})
    return tags | holdout_tags(holdout or {}, params)


def model_kwargs(
    segmenter: Path,
    classifier: Path,
    lesion: Path,
    crop: CropConfig,
    threshold: float,
    gate: GateConfig,
    example: tuple[str, bytes],
    workdir: Path,
    study_top: TopSlices = ALL_SLICES,
    study_threshold: float | None = None,
    outside_lungs: float = 0.0,
) -> dict[str, Any]:
    """Arguments shared by ``save_model`` and ``log_model``, so the local copy and the
    registered one are built the same way."""
    settings_file = workdir / "settings.json"
    settings_file.write_text(
        json.dumps(settings(crop, threshold, gate, study_top, study_threshold, outside_lungs), indent=2)
    )
    return {
        "python_model": str(Path(__file__).with_name("model_code.py")),  # no pickle in the model
        "artifacts": dict(zip(ARTIFACTS, map(str, (segmenter, classifier, settings_file, lesion)), strict=True)),
        "code_paths": [str(Path(covidct.__file__).parent)],  # the model runs with the code that trained it
        "signature": SIGNATURE,
        "input_example": pd.DataFrame({IMAGE: [example[1]], NAME: [example[0]]}),
        "pip_requirements": requirements(),
    }


def reproducible_model(kwargs: Mapping[str, Any]) -> Model:
    """MLmodel fields that stay the same when the same weights are saved again, so a matching
    reproduction leaves ``dvc.lock`` unchanged: the id is a hash of the artifacts, and the time is
    ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention; the Unix epoch when unset). When the
    pipeline was made is recorded where it belongs: the registered version and its run."""
    digest = hashlib.sha256()
    for name in ARTIFACTS:
        digest.update(Path(kwargs["artifacts"][name]).read_bytes())
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not epoch.isdigit():
        raise ConfigError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}")
    created = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).replace(tzinfo=None)
    return Model(utc_time_created=created, model_uuid=uuid.UUID(bytes=digest.digest()[:16]).hex)


def _portable(path: str, root: Path) -> str:
    """``path`` relative to the repository, or its bare name when it lies outside (a temp file)."""
    return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else Path(path).name


def _portable_sources(model_dir: Path, root: Path) -> None:
    """MLmodel records where its code and artifacts were copied from by absolute path (this
    clone's, a temp dir's); MLflow reads only their copies inside the model, so the record is
    made repo-relative and two clones save the same bytes."""
    model = Model.load(str(model_dir))
    flavor = model.flavors["python_function"]
    flavor["model_code_path"] = _portable(flavor["model_code_path"], root)
    for artifact in flavor["artifacts"].values():
        artifact["uri"] = _portable(artifact["uri"], root)
    model.save(str(model_dir / "MLmodel"))


def save_pipeline(out: Path, kwargs: Mapping[str, Any], root: Path) -> None:
    """The model directory at ``out`` (``mlflow models serve -m out`` serves it), replaced whole."""
    with atomic_dir(out) as tmp:
        mlflow.pyfunc.save_model(path=str(tmp), mlflow_model=reproducible_model(kwargs), **kwargs)
        _portable_sources(tmp, root.resolve())


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
    files: tuple[Path, Path, Path],
    crop: CropConfig,
    gate: GateConfig,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    example: tuple[str, bytes],
    sources: Mapping[str, Any] | None = None,
    holdout: Mapping[str, Any] | None = None,
    lesion: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Save the pipeline to ``out`` and register the same model; ``metrics`` is the evaluate
    stage's entry for the cropped variant (threshold, val and test metrics), ``sources`` the
    evaluate_sources stage's figures; ``files``: the lung segmenter's, the classifier's and the
    lesion segmenter's weights."""
    with tempfile.TemporaryDirectory() as workdir:
        # aggregation and threshold chosen on the validation scans of the sources trained on
        studies = (sources or {}).get("studies", {})
        top, study_threshold = TopSlices.from_settings(studies), studies.get("threshold")
        outside = float(studies.get("outside_lungs", 0.0))
        kwargs = model_kwargs(
            *files, crop, float(metrics["threshold"]), gate, example, Path(workdir), top, study_threshold, outside
        )
        save_pipeline(out, kwargs, root)
        variant = str(params["classifier"]["model"])
        sweeps = sweep_tags(root / CONFIRMATIONS, params)
        tags = version_tags(root, params, metrics, variant, sources or {}, holdout, lesion, sweeps)
        return register_pipeline(model_name, kwargs, tags)
