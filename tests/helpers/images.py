"""Images the tests make: a PNG that declares pixels it does not hold, a CT DICOM written from a grey picture."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from covidct.images import LUNG_WINDOW_HU


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid 8-bit grayscale PNG header declaring width x height, no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def write_ct_dicom(path: Path, gray: np.ndarray, modality: str = "CT", photometric: str = "MONOCHROME2") -> None:
    """A single-slice DICOM whose stored values map back onto ``gray`` through the lung window."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = (
        CTImageStorage,
        generate_uid(),
        ExplicitVRLittleEndian,
    )
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 0
    level, width = LUNG_WINDOW_HU
    ds.RescaleSlope, ds.RescaleIntercept = (
        f"{width / 255:.10f}",
        f"{level - width / 2:.10f}",
    )  # HU = g * width/255 + (level - width/2)
    ds.PixelData = gray.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
