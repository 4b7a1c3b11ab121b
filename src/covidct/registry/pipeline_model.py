"""The unit users promote and run: decode, lung segmentation, crop, classifier and decision
threshold as one MLflow pyfunc model.

Its input is the encoded scan (PNG, JPEG or DICOM bytes; base64 in a REST request), its output
one row per scan: COVID probability, label, threshold, lung box, the lesion burden (the share of
the lung the lesion segmenter marks, :mod:`covidct.lesions`), and an error for a scan that
could not be read or that the input gate (:mod:`covidct.gate`) refuses as no usable chest CT
slice; such a scan gets no label, and the other scans are still scored. Weights are safetensors
state dicts (:mod:`covidct.checkpoints`) loaded by this code, not pickled modules, so opening a
model never runs code from its files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from covidct.classification.adaptation import adapt_batchnorm
from covidct.classification.inputs import classifier_view
from covidct.classification.model import load_classifier
from covidct.classification.train import predict_scores
from covidct.config import CropConfig, GateConfig
from covidct.gate import body_midline, image_problem, lung_evidence, lung_problem
from covidct.images import ImageReadError, decode_grayscale
from covidct.lesions import LesionBurden, lesion_burden, segment_lesions, study_burden
from covidct.lung_crop import segment_and_crop
from covidct.runtime import autocast_dtype, select_device
from covidct.segmentation.model import load_segmenter
from covidct.verdicts import ALL_SLICES, TopSlices, study_probabilities

IMAGE, NAME, STUDY = "image", "name", "study"
LABELS = ("non-COVID", "COVID")
BOX = ("x_min", "y_min", "x_max", "y_max")
BURDEN = ("lesion_burden", "lesion_burden_image_left", "lesion_burden_image_right")
STUDY_OUTPUT = (STUDY, "outside_lungs", "study_probability", "study_label", "study_lesion_burden")
OUTPUT = ("probability", "label", "threshold", *BOX, "lung_fraction", *BURDEN, "crop_fallback", "error", *STUDY_OUTPUT)
ARTIFACTS = ("segmenter", "classifier", "settings", "lesion")  # versions registered before issue 27 have no lesion
CLASSIFIER_BATCH = 32  # as the train_classifier stage scores val and test, so scores match it bit for bit

SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec("binary", IMAGE), ColSpec("string", NAME, required=False), ColSpec("string", STUDY, required=False)]
    ),
    outputs=Schema(
        [
            ColSpec("double", "probability"),
            ColSpec("string", "label"),
            ColSpec("double", "threshold"),
            *(ColSpec("long", name) for name in BOX),
            ColSpec("double", "lung_fraction"),
            *(ColSpec("double", name) for name in BURDEN),
            ColSpec("string", "crop_fallback"),
            ColSpec("string", "error"),
            ColSpec("string", STUDY),
            ColSpec("boolean", "outside_lungs"),
            ColSpec("double", "study_probability"),
            ColSpec("string", "study_label"),
            ColSpec("double", "study_lesion_burden"),
        ]
    ),
)


@dataclass(frozen=True)
class ScanPrediction:
    """One scan's answer; ``mask`` (the cleaned lung mask at the scan's size) and ``lesion`` (the
    lesion mask inside it) are for overlays; ``burden`` is None where the pipeline has no lesion net."""

    name: str
    probability: float | None = None
    threshold: float | None = None
    box: tuple[int, int, int, int] | None = None
    lung_fraction: float | None = None
    crop_fallback: str = ""
    error: str = ""
    mask: np.ndarray | None = None
    burden: LesionBurden | None = None
    lesion: np.ndarray | None = None
    no_lung: bool = False  # refused by the gate for too little lung: in a series, a slice outside the lungs
    classifier_input: np.ndarray | None = None  # what the classifier scored: re-scored after BatchNorm adaptation

    def outside_lungs(self, below: float) -> bool:
        """A slice of a series that shows (almost) no lung: the apex, the bases, the neck or the abdomen."""
        return self.no_lung or (self.lung_fraction is not None and self.lung_fraction < below)

    def row(self) -> dict[str, Any]:
        ok = self.probability is not None
        return {
            "probability": self.probability,
            "label": LABELS[self.probability >= self.threshold] if ok else None,
            "threshold": self.threshold,
            **dict(zip(BOX, self.box if ok else (None,) * 4, strict=True)),
            "lung_fraction": self.lung_fraction,
            **dict(zip(BURDEN, self._burden(), strict=True)),
            "crop_fallback": self.crop_fallback,
            "error": self.error,
        }

    def _burden(self) -> tuple[float | None, float | None, float | None]:
        b = self.burden
        return (b.fraction, b.left, b.right) if b is not None and self.probability is not None else (None, None, None)


def predictions_table(
    predictions: Sequence[ScanPrediction],
    studies: Sequence[str] | None = None,
    top: TopSlices = ALL_SLICES,
    study_threshold: float | None = None,
    outside_below: float = 0.0,
) -> pd.DataFrame:
    """One row per scan; ``studies`` (an id per scan, empty for none) adds each study's verdict
    (:mod:`covidct.verdicts`; labelled at ``study_threshold``, else at the slice threshold) to its
    scans' rows. A slice of a study with lung under ``outside_below`` of the image, or none the
    gate would take, is outside the lungs: marked, left out of the verdict and the study's burden,
    and not an error. Object columns keep ``None`` for failed scans, so the JSON answer says null, not NaN."""
    studies = list(studies) if studies is not None else [""] * len(predictions)
    outside = [bool(s) and p.outside_lungs(outside_below) for p, s in zip(predictions, studies, strict=True)]
    inside = [p if not out else replace(p, probability=None) for p, out in zip(predictions, outside, strict=True)]
    verdicts = study_probabilities(studies, [p.probability for p in inside], top)
    burdens = {
        study: study_burden(
            p.burden for p, s in zip(inside, studies, strict=True) if s == study and p.probability is not None
        )
        for study in verdicts
    }
    threshold = (
        study_threshold
        if study_threshold is not None
        else next((p.threshold for p in predictions if p.threshold is not None), None)
    )
    rows = []
    for prediction, study, out in zip(predictions, studies, outside, strict=True):
        score = verdicts.get(study)
        label = LABELS[score >= threshold] if score is not None and threshold is not None else None
        burden = burdens.get(study)
        row = prediction.row() | ({"error": ""} if out and prediction.no_lung else {})  # counted, not an error
        rows.append(
            row
            | {
                STUDY: study or None,
                "outside_lungs": out if study else None,
                "study_probability": score,
                "study_label": label,
                "study_lesion_burden": burden.fraction if burden is not None else None,
            }
        )
    return pd.DataFrame(rows, columns=list(OUTPUT), dtype=object)


class TwoStagePipeline:
    """The paper's method on raw scans, through the functions the DVC stages use, so a scan of
    the test split gets exactly the score the evaluate stage saw."""

    def __init__(
        self,
        segmenter_path: Path,
        classifier_path: Path,
        crop: CropConfig,
        threshold: float,
        gate: GateConfig | None = None,
        device: torch.device | None = None,
        study_top: TopSlices = ALL_SLICES,
        study_threshold: float | None = None,
        lesion_path: Path | None = None,
        outside_lungs: float = 0.0,
    ) -> None:
        self.device = device or select_device()
        self.segmenter, self.segmenter_meta = load_segmenter(segmenter_path, self.device)
        self.lesion, self.lesion_meta = load_segmenter(lesion_path, self.device) if lesion_path else (None, {})
        self.outside_lungs = outside_lungs  # a series' slice with less lung is outside the lungs
        self.classifier, self.classifier_meta = load_classifier(classifier_path, self.device)
        self.crop, self.threshold, self.gate, self.study_top, self.study_threshold = (
            crop,
            threshold,
            gate,
            study_top,
            study_threshold,
        )

    @classmethod
    def from_artifacts(cls, artifacts: dict[str, str], device: torch.device | None = None) -> TwoStagePipeline:
        settings = json.loads(Path(artifacts["settings"]).read_text())
        gate = (
            GateConfig(**settings["gate"]) if "gate" in settings else None
        )  # versions registered before the gate have none
        paths = Path(artifacts["segmenter"]), Path(artifacts["classifier"])
        study_threshold = settings.get("study_threshold")  # absent in versions registered before it was chosen
        return cls(
            *paths,
            CropConfig(**settings["crop"]),
            float(settings["threshold"]),
            gate,
            device,
            TopSlices.from_settings(settings, prefix="study_"),
            study_threshold,
            Path(artifacts["lesion"]) if "lesion" in artifacts else None,
            float(settings.get("outside_lungs", 0.0)),  # absent in versions registered before issue 27
        )

    def predict_arrays(self, names: Sequence[str], images: Sequence[np.ndarray]) -> list[ScanPrediction]:
        """uint8 grayscale scans -> predictions; segmented in batches of ``crop.batch_size``;
        what the gate refuses gets its reason and no score."""
        kept, crops, refused = self._gated_crops(names, images)
        scored = self._with_burden(self._classify([names[i] for i in kept], crops), [images[i] for i in kept])
        by_index = dict(zip(kept, scored, strict=True)) | refused
        return [by_index[i] for i in range(len(images))]

    def adapt_batchnorm(self, predictions: Sequence[ScanPrediction]) -> list[ScanPrediction]:
        """BatchNorm statistics from one site's scored scans (:mod:`covidct.classification.adaptation`),
        then those scans' probabilities again from the inputs the classifier already saw: nothing is
        decoded or segmented twice. Every later score uses the new statistics too."""
        scored = [i for i, p in enumerate(predictions) if p.classifier_input is not None]
        inputs = np.stack([predictions[i].classifier_input for i in scored]) if scored else np.empty((0, 1, 1))
        meta = self.classifier_meta
        adapt_batchnorm(self.classifier, inputs, meta["mean"], meta["std"], self.device, CLASSIFIER_BATCH)
        again = dict(zip(scored, self._scores(inputs), strict=True))
        return [replace(p, probability=float(again[i])) if i in again else p for i, p in enumerate(predictions)]

    def _gated_crops(
        self, names: Sequence[str], images: Sequence[np.ndarray]
    ) -> tuple[list[int], list, dict[int, ScanPrediction]]:
        """The indices of the scans the gate lets through, their crops, and the refused ones' predictions."""
        refused = {
            i: ScanPrediction(names[i], error=why)
            for i, image in enumerate(images)
            if self.gate and (why := image_problem(image, self.gate))
        }
        kept = [i for i in range(len(images)) if i not in refused]
        crops = []
        for start in range(0, len(kept), self.crop.batch_size):
            batch = [images[i] for i in kept[start : start + self.crop.batch_size]]
            crops += segment_and_crop(batch, self.segmenter, self.segmenter_meta, self.crop, self.device)
        if self.gate:
            for i, c in zip(list(kept), list(crops), strict=True):
                evidence = lung_evidence(c.mask, images[i])
                if why := lung_problem(evidence, self.gate):
                    refused[i] = ScanPrediction(
                        names[i],
                        lung_fraction=float(c.crop.lung_fraction),
                        error=why,
                        mask=c.mask,
                        no_lung=evidence.fraction < self.gate.min_lung_fraction,
                    )
            crops = [c for i, c in zip(kept, crops, strict=True) if i not in refused]
            kept = [i for i in kept if i not in refused]
        return kept, crops, refused

    def _classifier_inputs(self, crops: Sequence) -> np.ndarray:
        size, meta = self.classifier_meta["image_size"], self.classifier_meta
        views = (
            meta.get("lung_mask", False),
            meta.get("standardise", False),
        )  # absent in checkpoints from before the options
        equalise = meta.get("equalise", False)
        return (
            np.stack(
                [classifier_view(c.crop.image, c.lung if any(views) else None, size, *views, equalise) for c in crops]
            )
            if crops
            else np.empty((0, size, size), np.uint8)
        )

    def _scores(self, inputs: np.ndarray) -> np.ndarray:
        if not len(inputs):
            return np.empty(0)
        return predict_scores(
            self.classifier,
            inputs,
            self.device,
            self.classifier_meta["mean"],
            self.classifier_meta["std"],
            CLASSIFIER_BATCH,
            tta=self.classifier_meta.get("tta", False),
            dtype=autocast_dtype(self.device, self.classifier_meta.get("precision", "auto")),
        )

    def _classify(self, names: Sequence[str], crops: Sequence) -> list[ScanPrediction]:
        inputs = self._classifier_inputs(crops)
        scores = self._scores(inputs)
        return [
            ScanPrediction(
                name,
                float(score),
                self.threshold,
                tuple(int(v) for v in c.crop.box),
                float(c.crop.lung_fraction),
                c.crop.fallback or "",
                mask=c.mask,
                classifier_input=image,
            )
            for name, c, score, image in zip(names, crops, scores, inputs, strict=True)
        ]

    def _with_burden(self, scored: list[ScanPrediction], images: Sequence[np.ndarray]) -> list[ScanPrediction]:
        """Each scored scan with its lesion mask (inside its lung) and burden, in segmenter-sized batches."""
        if self.lesion is None:
            return scored
        out = []
        for start in range(0, len(scored), self.crop.batch_size):
            batch = images[start : start + self.crop.batch_size]
            lesions = segment_lesions(batch, self.lesion, self.lesion_meta, self.device)
            for prediction, image, lesion in zip(scored[start : start + len(batch)], batch, lesions, strict=True):
                inside = lesion & prediction.mask
                burden = lesion_burden(inside, prediction.mask, body_midline(image))
                out.append(replace(prediction, burden=burden, lesion=inside))
        return out

    def predict_encoded(self, names: Sequence[str], blobs: Sequence[bytes]) -> list[ScanPrediction]:
        """Encoded scans -> predictions in input order; an unreadable scan gets its error."""
        decoded, failed = {}, {}
        for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
            try:
                decoded[i] = decode_grayscale(bytes(blob), name)
            except ImageReadError as exc:
                failed[i] = ScanPrediction(name, error=exc.reason)
        scored = dict(
            zip(decoded, self.predict_arrays([names[i] for i in decoded], list(decoded.values())), strict=True)
        )
        return [scored.get(i) or failed[i] for i in range(len(names))]


class PipelineModel(mlflow.pyfunc.PythonModel):
    """MLflow's face of :class:`TwoStagePipeline`: a DataFrame with an ``image`` column of bytes
    (optionally ``name``, used in error messages, and ``study``, grouping slices into studies
    that get one verdict each) in, :data:`OUTPUT` columns out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.pipeline = TwoStagePipeline.from_artifacts(context.artifacts)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if IMAGE not in frame:
            raise ValueError(
                f"input needs an {IMAGE!r} column of encoded scans (base64 in JSON); got columns {list(frame.columns)}"
            )
        names = [str(n) for n in frame[NAME]] if NAME in frame else [f"row {i}" for i in range(len(frame))]
        studies = [str(s) if isinstance(s, str) else "" for s in frame[STUDY]] if STUDY in frame else None
        return predictions_table(
            self.pipeline.predict_encoded(names, list(frame[IMAGE])),
            studies,
            self.pipeline.study_top,
            self.pipeline.study_threshold,
            self.pipeline.outside_lungs,
        )


def settings(
    crop: CropConfig,
    threshold: float,
    gate: GateConfig,
    study_top: TopSlices = ALL_SLICES,
    study_threshold: float | None = None,
    outside_lungs: float = 0.0,
) -> dict[str, Any]:
    """What the pipeline needs besides the weight files (the preprocessing is in their meta)."""
    return {
        "crop": crop.model_dump(),
        "threshold": threshold,
        "gate": gate.model_dump(),
        **{f"study_{key}": value for key, value in study_top.settings().items()},
        "study_threshold": study_threshold,
        "outside_lungs": outside_lungs,
    }
