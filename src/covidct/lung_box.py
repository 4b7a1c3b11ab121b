"""The lung box: cleaning a segmenter's mask, its bounding box, the paper's r-shrink, the crop
resized back, and nearest-neighbour mask resizing (drawing them is :mod:`covidct.overlays`).

Box convention used throughout this module
------------------------------------------
A box is ``(x_min, y_min, x_max, y_max)`` of **inclusive** pixel indices: ``x`` is the column
(0..width-1) and ``y`` the row (0..height-1). The pixels it covers are
``image[y_min:y_max + 1, x_min:x_max + 1]``, so its size is
``(x_max - x_min + 1) x (y_max - y_min + 1)``. A full ``H x W`` image is ``(0, 0, W-1, H-1)``.

The paper (Tran et al.) crops ``((x_min + r, y_min + r), (x_max - r, y_max - r))`` with
``r = 5`` px around the predicted lung mask and resizes the crop back to the original size
with bilinear interpolation; :func:`shrink_box` and :func:`crop_to_lung_bbox` implement that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

__all__ = [
    "Box",
    "CropResult",
    "as_bool_mask",
    "clean_lung_mask",
    "clip_box",
    "crop_to_lung_bbox",
    "lung_bbox",
    "resize_mask",
    "shrink_box",
]

Box = tuple[int, int, int, int]

#: dtypes accepted by :func:`crop_to_lung_bbox` (those cv2.resize handles with INTER_LINEAR).
_RESIZABLE = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def as_bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D (HxW), got shape {m.shape}")
    return m if m.dtype == np.bool_ else m != 0


def clean_lung_mask(mask: np.ndarray, keep_components: int = 2, fill_holes: bool = True) -> np.ndarray:
    """Keep the ``keep_components`` largest 8-connected components of ``mask`` and fill holes.

    Removes small spurious blobs (burnt-in text, table, page background) from a predicted lung
    mask. Ties in size are broken by label order (top-left first). Non-zero means lung.
    """
    if keep_components < 1:
        raise ValueError(f"keep_components must be >= 1, got {keep_components}")
    m = as_bool_mask(mask)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n > keep_components:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")  # largest first, stable on ties
        keep = np.zeros(n + 1, dtype=bool)
        keep[order[:keep_components] + 1] = True
        out = keep[labels]
    else:
        out = m.copy()
    if fill_holes and out.any():
        out = ndimage.binary_fill_holes(out)
    return np.asarray(out, dtype=bool)


def lung_bbox(mask: np.ndarray) -> Box | None:
    """Inclusive ``(x_min, y_min, x_max, y_max)`` of the True (non-zero) pixels; None if empty."""
    m = as_bool_mask(mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def clip_box(box: Sequence[int], width: int, height: int) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    return (
        min(max(x0, 0), width - 1),
        min(max(y0, 0), height - 1),
        min(max(x1, 0), width - 1),
        min(max(y1, 0), height - 1),
    )


def shrink_box(box: Sequence[int], r: int, width: int, height: int) -> Box:
    """Paper's rule: ``(x_min + r, y_min + r, x_max - r, y_max - r)``, clipped to the image.

    Boxes are inclusive pixel indices (see module doc). ``r > 0`` shrinks the box by ``r``
    pixels on every side, ``r < 0`` grows it (clipped at the image edges), ``r = 0`` only clips.
    If shrinking would leave a degenerate box (``x_max < x_min`` or ``y_max < y_min``), the
    unshrunk box, clipped to the image, is returned instead. A 1-pixel-wide box is valid.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"invalid box {tuple(box)}: need x_min <= x_max and y_min <= y_max")
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image")
    r = int(r)
    shrunk = clip_box((x0 + r, y0 + r, x1 - r, y1 - r), width, height)
    if shrunk[2] < shrunk[0] or shrunk[3] < shrunk[1]:
        return clip_box((x0, y0, x1, y1), width, height)
    return shrunk


@dataclass(frozen=True)
class CropResult:
    """Output of :func:`crop_to_lung_bbox`.

    ``image`` has the input's shape and dtype; ``box`` is the inclusive crop box in input
    coordinates (the full image when a fallback applied); ``lung_fraction`` is ``mask.mean()``;
    ``fallback`` is None when the image was cropped, else ``"empty_mask"`` or ``"small_mask"``.
    """

    image: np.ndarray
    box: Box
    lung_fraction: float
    fallback: str | None


def crop_to_lung_bbox(image: np.ndarray, mask: np.ndarray, r: int, min_lung_fraction: float = 0.02) -> CropResult:
    """Crop ``image`` to the lung box shrunk by ``r`` and resize it back to the original size.

    ``mask`` must have the image's HxW (resize a predicted mask first with :func:`resize_mask`).
    If the mask is empty or covers less than ``min_lung_fraction`` of the image, the whole image
    is kept unchanged (copied) and ``fallback`` says why. Otherwise the crop
    ``image[y_min:y_max+1, x_min:x_max+1]`` of :func:`shrink_box`'s box is resized to the
    original HxW with bilinear interpolation (``cv2.INTER_LINEAR``, half-pixel centres).
    Works for HxW and HxWxC arrays (uint8, uint16, int16, float32, float64).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be HxW or HxWxC, got shape {img.shape}")
    if img.dtype.type not in _RESIZABLE:
        raise ValueError(f"unsupported image dtype {img.dtype}; use uint8, uint16, int16 or float")
    height, width = img.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    m = as_bool_mask(mask)
    if m.shape != (height, width):
        raise ValueError(f"mask shape {m.shape} does not match image HxW {(height, width)}")

    full: Box = (0, 0, width - 1, height - 1)
    fraction = float(m.mean())
    bbox = lung_bbox(m)
    if bbox is None:
        return CropResult(img.copy(), full, fraction, "empty_mask")
    if fraction < min_lung_fraction:
        return CropResult(img.copy(), full, fraction, "small_mask")

    box = shrink_box(bbox, r, width, height)
    x0, y0, x1, y1 = box
    crop = np.ascontiguousarray(img[y0 : y1 + 1, x0 : x1 + 1])
    if crop.shape[:2] == (height, width):
        out = crop.copy()
    else:
        out = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)  # dsize=(W, H)
        if out.ndim == 2 and img.ndim == 3:  # cv2 drops a trailing single channel
            out = out[:, :, None]
    return CropResult(out, box, fraction, None)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to ``height x width`` (bool, pixel-centre aligned).

    Output pixel ``(i, j)`` takes the source pixel containing its centre, i.e. row
    ``floor((i + 0.5) * H_src / height)`` (the same rule as Pillow's NEAREST).
    """
    m = as_bool_mask(mask)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    h, w = m.shape
    if h < 1 or w < 1:
        raise ValueError(f"empty mask of shape {m.shape}")
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return m[rows[:, None], cols[None, :]]
