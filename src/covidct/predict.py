"""Run a registered pipeline on scans on disk: files or folders in, one CSV row per scan out
(an unreadable file gets its error in the row and the others are still scored), a verdict
per DICOM series (a study), and optionally overlays of the lung mask, the lesion and the crop
box for a person to check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.images import ImageReadError, decode_grayscale, is_dicom, is_image, write_png
from covidct.overlays import draw_lesion, draw_overlay
from covidct.registry.pipeline_model import OUTPUT, STUDY, ScanPrediction, TwoStagePipeline, predictions_table
from covidct.series import read_series
from covidct.verdicts import ALL_SLICES, TopSlices

#: What folders are searched for: pictures and DICOM, recognised by content whatever the name.
SCAN_KINDS = "PNG, JPEG, TIFF, GIF, BMP, WebP or DICOM"
#: A file so named is a scan even when its content is not (a damaged one gets its error row).
SCAN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".webp", ".dcm", ".dicom")


def _is_scan(path: Path) -> bool:
    if path.suffix.lower() in SCAN_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return True  # kept, so it gets its own error row
    return is_image(head) or is_dicom(head)


def collect_scans(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Files as given (read whatever they are), and every picture or DICOM file inside folders,
    recognised by content (exports often have no suffix, a .tif is a picture like a .png), in a
    stable order; and the folders' other files, skipped, for the caller to say so. A missing path
    is kept, so it gets its own error row instead of stopping the batch."""
    found: list[Path] = []
    skipped: list[Path] = []
    for path in paths:
        if path.is_dir():
            for p in sorted(p for p in path.rglob("*") if p.is_file()):
                (found if _is_scan(p) else skipped).append(p)
        else:
            found.append(path)
    return found, skipped


def group_studies(files: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """``files`` with the slices of each DICOM series of two or more slices put together in
    anatomical order (:mod:`covidct.series`: positions, not file names), and each file's study
    id (the series UID; empty for a lone picture). A file whose header cannot be read stays
    where it was, to get its error row."""
    readable = []
    for path in files:
        try:
            with path.open("rb") as handle:
                if is_dicom(handle.read(132)):
                    readable.append(path)
        except OSError:
            continue
    while True:  # one pass over the headers; a file whose header is unreadable leaves and the rest are read again
        try:
            series = [s for s in read_series(readable) if len(s.files) > 1] if readable else []
            break
        except ImageReadError as exc:
            left = [f for f in readable if Path(f) != exc.path]
            if len(left) == len(readable):  # not one of ours: no study grouping rather than a loop
                series = []
                break
            readable = left
    study_of = {f: s.series_uid or f"series {i + 1}" for i, s in enumerate(series) for f in s.files}
    ordered, placed = [], set()
    for path in files:
        if path in placed:
            continue
        group = next((s.files for s in series if path in s.files), [path])
        ordered += group
        placed.update(group)
    return ordered, [study_of.get(f, "") for f in ordered]


def load_pipeline(model_uri: str) -> TwoStagePipeline:
    """The registered model's own pipeline object, for the masks the REST answer leaves out."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().pipeline


def predict_files(pipeline: TwoStagePipeline, files: Sequence[Path], batch_size: int = 64) -> list[ScanPrediction]:
    """Batches bound the memory: originals can be 2 Mpx each."""
    out: list[ScanPrediction] = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=len(files) <= batch_size):
        chunk = files[start : start + batch_size]
        blobs, errors = {}, {}
        for i, path in enumerate(chunk):
            try:
                blobs[i] = path.read_bytes()
            except FileNotFoundError:
                errors[i] = "file not found"
            except OSError as exc:
                errors[i] = f"cannot read file ({exc.strerror or exc})"
        scored = dict(
            zip(blobs, pipeline.predict_encoded([str(chunk[i]) for i in blobs], list(blobs.values())), strict=True)
        )
        out += [
            scored[i] if i in scored else ScanPrediction(str(path), error=errors[i]) for i, path in enumerate(chunk)
        ]
    return out


def write_predictions(
    predictions: Sequence[ScanPrediction],
    out_csv: Path,
    studies: Sequence[str] | None = None,
    top: TopSlices = ALL_SLICES,
    study_threshold: float | None = None,
    outside_lungs: float = 0.0,
) -> pd.DataFrame:
    """One row per scan in ``out_csv``; with studies, one row per study beside it (``<name>_studies.csv``)."""
    table = predictions_table(predictions, studies, top, study_threshold, outside_lungs)
    table.insert(0, "file", [p.name for p in predictions])
    write_text_atomic(out_csv, table[["file", *OUTPUT]].to_csv(index=False))
    if table[STUDY].notna().any():
        grouped = table[table[STUDY].notna()].groupby(STUDY, sort=False)
        studies_table = grouped.agg(
            slices=("file", "size"),
            slices_scored=("probability", "count"),
            slices_outside_lungs=("outside_lungs", "sum"),
            study_probability=("study_probability", "first"),
            study_label=("study_label", "first"),
            study_lesion_burden=("study_lesion_burden", "first"),
        ).reset_index()
        write_text_atomic(studies_csv(out_csv), studies_table.assign(**top.settings()).to_csv(index=False))
    return table


def studies_csv(out_csv: Path) -> Path:
    return out_csv.with_name(f"{out_csv.stem}_studies.csv")


def write_overlays(predictions: Sequence[ScanPrediction], out_dir: Path) -> int:
    """``<stem>.png`` per scored scan (``<stem>-2.png``... when stems repeat); returns how many."""
    used: set[str] = set()
    written = 0
    for prediction in predictions:
        if prediction.mask is None:
            continue
        stem, n = Path(prediction.name).stem, 1
        while (name := stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        used.add(name)
        image = decode_grayscale(Path(prediction.name).read_bytes(), prediction.name)
        overlay = draw_overlay(image, prediction.mask, prediction.box)
        if prediction.lesion is not None:
            overlay = draw_lesion(overlay, prediction.lesion)
        write_png(out_dir / f"{name}.png", overlay)
        written += 1
    return written
