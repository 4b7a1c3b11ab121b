"""Stage register_model: the cropped (two-stage) pipeline as one MLflow model, saved to
``models/pipeline`` and registered as a new version; promotion stays a deliberate
``covidct promote``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from covidct.catalog import load_source
from covidct.config import CropConfig, GateConfig, RegistryConfig
from covidct.datasets import COVID_CT
from covidct.paths import LESION, LESION_REPORTS, METRICS, PIPELINE, REPORTS, SEGMENTER, SOURCE_REPORTS, raw
from covidct.paths import classifier_dir as model_dir
from covidct.registry.register import build_and_register
from covidct.tracking import stage_run

RAW, MODEL, OUT = raw(COVID_CT), SEGMENTER, PIPELINE
HOLDOUT = REPORTS / "levers" / "holdout.json"  # `covidct levers pipelines/levers/holdout.yaml` writes it
#: The sections the registered model embodies; recorded as version tags.
PARAM_SECTIONS = ("sources", "preprocess", "segmenter", "lesion", "crop", "classifier", "evaluate", "gate", "study")


def run(params: dict[str, Any], root: Path) -> None:
    registry, crop, gate = RegistryConfig.of(params), CropConfig.of(params), GateConfig.of(params)
    metrics = json.loads((root / METRICS).read_text())["cropped"]
    sources = json.loads((root / SOURCE_REPORTS / "metrics.json").read_text())
    # the recipe's leave-one-source-out figures, where the study ran it (pipelines/levers/holdout.yaml)
    lesion = json.loads((root / LESION_REPORTS / "metrics.json").read_text())
    holdout = json.loads((root / HOLDOUT).read_text()) if (root / HOLDOUT).is_file() else {}
    example = load_source(root, COVID_CT).query("split == 'val'").iloc[0]["relpath"]
    recorded = {name: params.get(name, {}) for name in PARAM_SECTIONS}
    with stage_run("register_model", {"registry": {"model_name": registry.model_name}}) as run:
        version = build_and_register(
            root,
            root / OUT,
            registry.model_name,
            (root / MODEL, root / model_dir("cropped") / "model.safetensors", root / LESION),
            crop,
            gate,
            metrics,
            recorded,
            (example, (root / RAW / example).read_bytes()),
            sources,
            holdout,
            lesion,
        )
        mlflow.set_tag("covidct.registered_version", version.version)
    print(
        f"registered {registry.model_name} version {version.version} (run {run.info.run_id[:8]}); "
        f"validation AUC {metrics['val']['auc']:.4f}, recall {metrics['val']['recall']:.4f} at threshold {metrics['threshold']:.4f}. "
        f"Promote with `covidct promote --version {version.version}`"
    )
