"""Robust image reading and writing for CT slices and lung masks.

All readers detect the format from the file's content, not its name (34 ``.png`` files in
COVID-CT ``CT_COVID`` hold JPEG bytes), decode the whole image (so truncated or corrupt files
fail here and not later inside a data loader), and raise :class:`ImageReadError` whose message
starts with the file path followed by one clear reason.

Grayscale conversion rules (:func:`read_grayscale`):

* ``L``: unchanged.
* ``1``: black/white to 0/255.
* ``RGB``, ``CMYK``, ``YCbCr``, ...: ITU-R 601-2 luma (Pillow's ``convert("L")``).
* ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``: composited over black (CT background is black),
  i.e. ``gray = luma * alpha / 255``.
* ``P``: palette to RGB (RGBA when the palette declares transparency, then composited over
  black), then luma.
* ``I;16*``, ``I`` (16/32-bit integer) and ``F`` (float): min-max scaled to 0..255 per image
  (not clipped); a constant image maps to 0. Non-finite float values map to 0.
* DICOM (found by its ``DICM`` marker): CT through a lung window, see :func:`decode_dicom`;
  uncompressed or compressed (JPEG, JPEG Lossless, JPEG-LS, JPEG 2000, RLE), one frame per file.

EXIF orientation is ignored (no file in the COVID-CT dataset carries a rotation tag), so the
pixel grid is the stored one, which keeps images and masks aligned.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from covidct.atomic import atomic_path

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "decode_dicom",
    "decode_grayscale",
    "is_dicom",
    "is_image",
    "read_grayscale",
    "read_mask",
    "write_png",
]

#: Refuse images with more pixels than this (decompression-bomb guard). The largest COVID-CT
#: image is 1671 x 1225 (about 2 Mpx), so 40 Mpx leaves ample headroom.
DEFAULT_MAX_PIXELS = 40_000_000

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageReadError(ValueError):
    """An image or mask file could not be read; the message starts with the file path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _sniff(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def is_image(head: bytes) -> bool:
    """Whether a file's first bytes start a picture format this module decodes (not DICOM: :func:`is_dicom`)."""
    return _sniff(head) is not None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file, or an :class:`ImageReadError` saying why it cannot be had."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file not found")
    if not p.is_file():
        raise ImageReadError(p, "not a regular file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ImageReadError(p, f"cannot read file ({exc.strerror or exc})") from exc


def _open_loaded(data: bytes, name: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Open the encoded image ``data`` (``name`` is for messages), check its declared size,
    decode it fully and return the loaded image."""
    p = name
    head = data[:64]
    if not data:
        raise ImageReadError(p, "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped Pillow's global switch; truncated files would then decode silently
        # with grey padding. Refuse rather than hand out silently corrupted pixels.
        raise ImageReadError(p, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to read with truncation allowed")

    sniffed = _sniff(head)
    try:
        with warnings.catch_warnings():
            # Pillow warns (above MAX_IMAGE_PIXELS) or raises (above twice that) at open time,
            # from the header alone; turn the warning into an error we can report.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(p, f"too many pixels, possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        if sniffed is not None:
            reason = f"{sniffed} signature but malformed header (invalid size or corrupt data)"
        elif _looks_like_text(head):
            reason = "not an image: the file contains text, not a known image format"
        else:
            reason = "unknown or unsupported image format"
        raise ImageReadError(p, reason) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a clear error
        # e.g. a JPEG cut off inside its (EXIF) header fails here, before any pixel is decoded
        what = f"truncated or corrupt {sniffed} header" if sniffed else "cannot open image"
        raise ImageReadError(p, f"{what} ({type(exc).__name__}: {exc})") from exc

    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageReadError(p, f"image has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise ImageReadError(
                p,
                f"too many pixels: {width}x{height} = {width * height} > limit {max_pixels} (possible decompression bomb)",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # full decode: truncated/corrupt data fails here
        except ImageReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(p, f"too many pixels, possible decompression bomb ({exc})") from exc
        except Exception as exc:  # noqa: BLE001
            fmt = im.format or sniffed or "image"
            raise ImageReadError(p, f"truncated or corrupt {fmt} data ({type(exc).__name__}: {exc})") from exc
    except BaseException:
        im.close()
        raise
    return im


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.nan)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo = float(np.nanmin(a))
    hi = float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (a - lo) * (255.0 / (hi - lo))
    out = np.nan_to_num(out, nan=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _composite_over_black(im: Image.Image) -> np.ndarray:
    """Gray luma times alpha (i.e. the image composited over a black background)."""
    rgba = im.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    luma = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float64)
    return np.clip(np.rint(luma * alpha / 255.0), 0, 255).astype(np.uint8)


def _to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode == "P":
        if "transparency" in im.info:
            return _composite_over_black(im.convert("RGBA"))
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode == "RGBa":  # premultiplied: luma of stored values already is "over black"
            return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
        return _composite_over_black(im)
    if mode.startswith("I") or mode == "F":
        return _minmax_to_uint8(np.asarray(im))
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def read_grayscale(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any supported image as a uint8 HxW grayscale array (see module doc for the rules).

    Raises :class:`ImageReadError` for a missing or empty file, an unknown format (e.g. text),
    truncated or corrupt data, more than ``max_pixels`` pixels, or a 0-size image. Pillow's own
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) still applies on top of ``max_pixels``.
    """
    return decode_grayscale(_read_bytes(path), path, max_pixels)


def decode_grayscale(data: bytes, name: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`read_grayscale` for bytes already in memory (an upload, a request); DICOM included.

    ``name`` only labels error messages.
    """
    if is_dicom(data):
        return decode_dicom(data, name, max_pixels)
    im = _open_loaded(data, name, max_pixels)
    try:
        try:
            gray = _to_gray(im)
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(name, f"cannot convert mode {im.mode!r} to grayscale ({exc})") from exc
        expected = (im.size[1], im.size[0])
    finally:
        im.close()
    if gray.shape != expected:
        raise ImageReadError(name, f"decoded array has shape {gray.shape}, expected {expected}")
    return np.ascontiguousarray(gray)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble, whatever their name."""
    return data[128:132] == b"DICM"


#: Lung window (level, width) in Hounsfield units for CT DICOM: the COVID-CT slices were taken
#: from figures shown in a lung window, so a raw CT series is mapped the same way.
LUNG_WINDOW_HU = (-600.0, 1500.0)


#: The pip package(s) that decode each compressed transfer syntax, named in error messages so
#: that a missing decoder says what to install. covidct pins python-gdcm (pydicom's only JPEG
#: Lossless plugin with a permissive licence), pylibjpeg-openjpeg and pylibjpeg-rle (pyproject.toml).
_DICOM_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "python-gdcm or Pillow",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "python-gdcm or Pillow for 8-bit samples; 12-bit samples only pylibjpeg-libjpeg (GPL-3.0)",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "python-gdcm",  # JPEG Lossless, Process 14
    "1.2.840.10008.1.2.4.70": "python-gdcm",  # JPEG Lossless, Process 14 SV1
    "1.2.840.10008.1.2.4.80": "python-gdcm or pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "python-gdcm or pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "python-gdcm or pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "python-gdcm or pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pydicom itself or pylibjpeg-rle",  # RLE Lossless
}


def _syntax_label(ts: str) -> str:
    """``'JPEG Lossless ...' (1.2.840...)`` for a known transfer syntax, the bare UID otherwise."""
    from pydicom.uid import UID

    uid = UID(ts)
    return f"{uid.name!r} ({uid})" if uid.name != str(uid) else f"{uid} (unknown to pydicom)"


def _no_decoder_reason(ts: str) -> str:
    package = _DICOM_DECODER_PACKAGES.get(str(ts))
    if package:
        return f"no installed decoder for DICOM transfer syntax {_syntax_label(ts)}; {package} would decode it (pip install it)"
    return (
        f"no decoder exists in pydicom for DICOM transfer syntax {_syntax_label(ts)}; no Python package covidct knows decodes it: "
        "export the series uncompressed (Explicit VR Little Endian) or as JPEG Lossless, JPEG-LS, JPEG 2000 or RLE"
    )


def decode_dicom(data: bytes, name: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One DICOM slice -> uint8 HxW: CT in Hounsfield units through :data:`LUNG_WINDOW_HU`,
    anything else min-max scaled; ``MONOCHROME1`` (white = low) inverted.

    Uncompressed and compressed transfer syntaxes (JPEG baseline/extended/lossless, JPEG-LS,
    JPEG 2000, HTJ2K, RLE) decode through pydicom's plugins; a syntax without an installed
    decoder fails with a reason naming the syntax and the package that would decode it.
    Multi-frame files are refused before their pixels are decoded.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, get_decoder

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad file
        raise ImageReadError(name, f"corrupt DICOM ({type(exc).__name__}: {exc})") from exc
    if frames != 1:
        raise ImageReadError(name, f"DICOM holds {frames} frames; give one grayscale slice per file")
    if rows * columns > max_pixels:
        raise ImageReadError(
            name,
            f"too many pixels: {columns}x{rows} = {rows * columns} > limit {max_pixels} (possible decompression bomb)",
        )
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:  # pydicom has no decoder at all for this UID
            available = False
        if not available:
            raise ImageReadError(name, _no_decoder_reason(ts))
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = f" in transfer syntax {_syntax_label(ts)}" if ts is not None else ""
        package = _DICOM_DECODER_PACKAGES.get(str(ts))
        decoders = f"; packages that decode this syntax: {package}" if package else ""
        raise ImageReadError(
            name, f"cannot decode DICOM pixel data{syntax} ({type(exc).__name__}: {exc}){decoders}"
        ) from exc
    if pixels.ndim != 2:
        raise ImageReadError(name, f"DICOM holds {pixels.shape} pixels; give one grayscale slice per file")
    if ds.get("Modality") == "CT":
        level, width = LUNG_WINDOW_HU
        values = (apply_modality_lut(pixels, ds).astype(np.float64) - (level - width / 2)) * (255.0 / width)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        gray = _minmax_to_uint8(pixels)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray
    return np.ascontiguousarray(gray)


def read_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a 0/255 8-bit single-channel mask as a bool HxW array (True = 255).

    ``shape`` is the expected (height, width); a mismatch raises :class:`ImageReadError`, as do
    a mode other than ``L``/``1`` and any value other than 0 and 255 (the message lists them).
    """
    p = Path(path)
    im = _open_loaded(_read_bytes(p), p, DEFAULT_MAX_PIXELS)
    try:
        if im.mode not in ("L", "1"):
            raise ImageReadError(p, f"mask must be 8-bit single-channel (mode L), got mode {im.mode!r}")
        arr = np.asarray(im.convert("L") if im.mode == "1" else im, dtype=np.uint8)
    finally:
        im.close()
    if shape is not None:
        exp = (int(shape[0]), int(shape[1]))
        if arr.shape != exp:
            raise ImageReadError(
                p,
                f"mask size {arr.shape[0]}x{arr.shape[1]} (HxW) does not match expected {exp[0]}x{exp[1]}",
            )
    values = np.unique(arr)
    bad = values[(values != 0) & (values != 255)]
    if bad.size:
        n_bad = int(np.isin(arr, bad).sum())
        listed = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ImageReadError(
            p,
            f"mask contains values other than 0 and 255: {listed} ({bad.size} distinct value(s), {n_bad} pixel(s))",
        )
    return arr == 255


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 HxW (gray) or HxWx3 (RGB) array as PNG, atomically."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_png expects a uint8 array, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"write_png expects HxW or HxWx3, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"write_png got an empty image of shape {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
