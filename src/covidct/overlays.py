"""Figures a person checks: a scan with its lung mask (green), crop box (red) and lesion
(magenta) drawn, and galleries of such overlays (the paper's Fig. 5 and 6)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

from covidct.atomic import atomic_path
from covidct.lung_box import as_bool_mask, clip_box

MASK_COLOR = (0, 255, 0)  # green: lung mask contour / fill
BOX_COLOR = (255, 0, 0)  # red: crop box
LESION_COLOR = (255, 0, 255)  # magenta: apart from the lung's green and the box's red


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif not (img.ndim == 3 and img.shape[2] in (3, 4)):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4 image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    return np.ascontiguousarray(img)


def draw_overlay(
    image_gray: np.ndarray,
    mask: np.ndarray | None,
    box: Sequence[int] | None,
    alpha: float = 0.3,
) -> np.ndarray:
    """HxWx3 uint8 RGB overlay for figures like the paper's Fig. 5/6.

    The scan is drawn in gray, the lung mask as a translucent green fill (``alpha``) with a solid
    green contour, and ``box`` (inclusive ``(x_min, y_min, x_max, y_max)``) as a red rectangle.
    ``mask`` and ``box`` may be None. Line width grows with the image (1 px up to ~400 px).
    """
    rgb = _to_rgb_uint8(image_gray).copy()
    height, width = rgb.shape[:2]
    thickness = max(1, int(round(min(height, width) / 400)))
    if mask is not None:
        m = as_bool_mask(mask)
        if m.shape != (height, width):
            raise ValueError(f"mask shape {m.shape} does not match image HxW {(height, width)}")
        color = np.array(MASK_COLOR, dtype=np.float64)
        if m.any():
            blended = rgb[m].astype(np.float64) * (1.0 - alpha) + color * alpha
            rgb[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            edge = m & ~ndimage.binary_erosion(m, border_value=0)
            if thickness > 1:
                edge = ndimage.binary_dilation(edge, iterations=thickness - 1)
            rgb[edge] = MASK_COLOR
    if box is not None:
        x0, y0, x1, y1 = clip_box(box, width, height)
        cv2.rectangle(rgb, (x0, y0), (x1, y1), BOX_COLOR, thickness=thickness)
    return rgb


def _fit_tile(tile: np.ndarray, max_side: int) -> np.ndarray:
    rgb = _to_rgb_uint8(tile)
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale == 1.0:
        return rgb
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(rgb, (nw, nh), interpolation=interp)


def save_gallery(
    rows: list[list[np.ndarray]],
    titles: list[str],
    path: str | os.PathLike[str],
    max_side: int = 256,
) -> None:
    """Save a grid PNG: one row per case (e.g. input, mask overlay, crop), one title per column.

    Each tile (uint8 HxW gray, or HxWx3 RGB) is resized so its longer side is ``max_side`` px,
    keeping its aspect ratio. Rows may be shorter than the longest row (empty cells stay blank).
    ``titles`` has one entry per column, or is empty for no titles. Written atomically.
    """
    if not rows or not any(rows):
        raise ValueError("save_gallery needs at least one non-empty row")
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    n_cols = max(len(row) for row in rows)
    if titles and len(titles) != n_cols:
        raise ValueError(f"got {len(titles)} titles for {n_cols} columns")
    tiles = [[_fit_tile(t, max_side) for t in row] for row in rows]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    cell = max_side / dpi
    title_h = 0.3 if titles else 0.0
    fig = Figure(figsize=(n_cols * cell, len(rows) * cell + title_h), dpi=dpi)
    FigureCanvasAgg(fig)
    top = 1.0 - title_h / (len(rows) * cell + title_h)
    grid = fig.add_gridspec(len(rows), n_cols, left=0, right=1, bottom=0, top=top, wspace=0.02, hspace=0.02)
    for i, row in enumerate(tiles):
        for j in range(n_cols):
            ax = fig.add_subplot(grid[i, j])
            ax.set_axis_off()
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            if i == 0 and titles:
                ax.set_title(titles[j], fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")


def draw_lesion(rgb: np.ndarray, lesion: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` (an overlay of :func:`draw_overlay`) with the lesion as a magenta fill
    and a solid outline, apart from the lung's green and the box's red."""
    out = rgb.copy()
    if lesion.shape != out.shape[:2]:
        raise ValueError(f"lesion mask {lesion.shape} does not match the overlay's {out.shape[:2]}")
    if lesion.any():
        color = np.array(LESION_COLOR, dtype=np.float64)
        out[lesion] = np.clip(np.rint(out[lesion] * (1.0 - alpha) + color * alpha), 0, 255).astype(np.uint8)
        out[lesion & ~ndimage.binary_erosion(lesion, border_value=0)] = LESION_COLOR
    return out
