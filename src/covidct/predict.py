"""Run a registered pipeline on scans on disk: files or folders in, one CSV row per scan out
(an unreadable file gets its error in the row and the others are still scored), and
optionally overlays of the lung mask and crop box for a person to check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.cropping import draw_overlay
from covidct.images import decode_grayscale, write_png
from covidct.registry.pipeline_model import OUTPUT, ScanPrediction, TwoStagePipeline, predictions_table

#: Files picked up inside folders (files named explicitly are read whatever their suffix).
SCAN_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def collect_scans(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders walked for :data:`SCAN_SUFFIXES`, in a stable order. A missing
    path is kept, so it gets its own error row instead of stopping the batch."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SCAN_SUFFIXES)
        else:
            found.append(path)
    return found


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
        scored = dict(zip(blobs, pipeline.predict_encoded([str(chunk[i]) for i in blobs], list(blobs.values())), strict=True))
        out += [scored[i] if i in scored else ScanPrediction(str(path), error=errors[i]) for i, path in enumerate(chunk)]
    return out


def write_predictions(predictions: Sequence[ScanPrediction], out_csv: Path) -> pd.DataFrame:
    table = predictions_table(predictions)
    table.insert(0, "file", [p.name for p in predictions])
    write_text_atomic(out_csv, table[["file", *OUTPUT]].to_csv(index=False))
    return table


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
        write_png(out_dir / f"{name}.png", draw_overlay(image, prediction.mask, prediction.box))
        written += 1
    return written
