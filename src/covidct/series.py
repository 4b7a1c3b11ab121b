"""Group DICOM files into series and put each series' slices in anatomical order.

A hospital export is a folder of slices whose file names and InstanceNumbers need not follow the
anatomy, often mixing series (scout, lung and soft-tissue kernels, a dose report). Slices are
ordered by where they lie, ImagePositionPatient projected on the slice normal, right for any
orientation or gantry tilt; only headers are read, so grouping a study costs about one slice's decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidct.images import ImageReadError, is_dicom

__all__ = ["ORDER_KEYS", "Series", "find_dicom_files", "read_series"]

#: What can order a series, best first; :attr:`Series.ordered_by` is one of these.
ORDER_KEYS = ("ImagePositionPatient", "SliceLocation", "InstanceNumber", "file name")


@dataclass
class Series:
    """One series, slices in order. ``ordered_by`` is the first of :data:`ORDER_KEYS` that every
    file has; ``positions`` are in mm, along the slice normal when ImagePositionPatient ordered
    the series, else the SliceLocation (None where absent)."""

    study_uid: str | None
    series_uid: str | None
    description: str
    files: list[Path]
    positions: list[float | None]
    ordered_by: str


@dataclass(frozen=True)
class _Header:
    path: Path
    study_uid: str | None
    series_uid: str | None
    description: str
    keys: tuple[float | None, float | None, int | None]  # one value per ORDER_KEYS[:3]


def _sniff_dicom(path: Path) -> bool:
    """Content, not suffix, says DICOM: exports often have no suffix, or ``.IMA``."""
    try:
        with path.open("rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def find_dicom_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The DICOM files anywhere under ``folder``; PNGs, text and other files are ignored."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and _sniff_dicom(p))


def _position(ds: Any) -> float | None:
    """ImagePositionPatient projected on the normal of ImageOrientationPatient, if both are valid."""
    try:
        origin, cosines = (
            np.array([float(v) for v in ds.get(k)]) for k in ("ImagePositionPatient", "ImageOrientationPatient")
        )
    except (TypeError, ValueError):  # absent or not numbers
        return None
    if origin.shape != (3,) or cosines.shape != (6,):
        return None
    normal = np.cross(cosines[:3], cosines[3:])  # row x column direction cosines
    position = float(origin @ normal)
    return position if np.isfinite(position) and np.linalg.norm(normal) > 1e-6 else None


def _read_header(path: Path) -> _Header | None:
    """The header of one file; None for a DICOM object that is not an image (DICOMDIR, dose SR)."""
    import pydicom
    from pydicom.uid import UID

    try:
        with path.open("rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            ended = fh.read(1) == b""  # stop_before_pixels leaves the file at Pixel Data, if any
        sop = UID(ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "")
        if ended and sop.name != str(sop) and "Image" not in sop.name:
            return None
        if ended:  # pydicom reads a cut-off header silently: an image must go on to Pixel Data
            raise ValueError("the file ends before its Pixel Data (truncated header)")
        study, series, location, number = (
            ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SliceLocation", "InstanceNumber")
        )
        keys = (
            _position(ds),
            float(location) if location not in (None, "") else None,
            int(number) if number not in (None, "") else None,
        )
        return _Header(
            path,
            str(study) if study else None,
            str(series) if series else None,
            str(ds.get("SeriesDescription") or ""),
            keys,
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad header
        raise ImageReadError(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from exc


def _series(headers: list[_Header]) -> Series:
    """Sort by the first key every header has; ties, and the last resort, go by file name."""
    by = next((i for i in range(3) if all(h.keys[i] is not None for h in headers)), 3)
    ordered = sorted(headers, key=lambda h: (h.keys[by] if by < 3 else 0, h.path.name, str(h.path)))
    first = ordered[0]
    positions = [h.keys[0] if by == 0 else h.keys[1] for h in ordered]
    return Series(
        first.study_uid, first.series_uid, first.description, [h.path for h in ordered], positions, ORDER_KEYS[by]
    )


def read_series(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Series]:
    """The image series in a folder (searched recursively; non-DICOM files skipped) or in a list
    of files (each must be DICOM), sorted by study UID, series UID and first file.

    Files are grouped by (StudyInstanceUID, SeriesInstanceUID); a file without a
    SeriesInstanceUID is a series of its own. DICOM objects without images (DICOMDIR, dose
    reports) are skipped. Raises :class:`~covidct.images.ImageReadError` naming the file when a
    header cannot be read, is cut short, or a listed file is not DICOM.
    """
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        paths = find_dicom_files(source)
    else:
        paths = [Path(source)] if isinstance(source, str | os.PathLike) else [Path(p) for p in source]
        for p in paths:
            if not _sniff_dicom(p):
                raise ImageReadError(
                    p, "not a DICOM file (no DICM marker at byte 128)" if p.is_file() else "file not found"
                )
    groups: dict[object, list[_Header]] = {}
    for header in filter(None, map(_read_header, paths)):
        key = (header.study_uid, header.series_uid) if header.series_uid else header.path
        groups.setdefault(key, []).append(header)
    result = [_series(headers) for headers in groups.values()]
    return sorted(result, key=lambda s: (s.study_uid or "", s.series_uid or "", str(s.files[0])))
