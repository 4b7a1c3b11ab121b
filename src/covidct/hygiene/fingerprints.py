"""Content fingerprints of a picture: a byte hash, a hash of the decoded pixels, and a 256-bit
perceptual hash of the picture trimmed to the body (why 256 bits and why trimmed: the package doc)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from covidct.images import read_grayscale

HASH_SIZE = 16  # pHash of 16 x 16 DCT coefficients: 256 bits (the 64-bit default cannot separate; see module doc)
HASH_BITS = HASH_SIZE * HASH_SIZE


def trim_to_body(gray: np.ndarray) -> np.ndarray:
    """The bounding box of the largest bright region (the body, by Otsu's threshold).

    Paper figures come with different margins; trimming them makes a looser or tighter
    crop of the same slice hash alike. An image with no bright region is returned whole.
    """
    threshold, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = gray > threshold
    labels, count = ndimage.label(bright)
    if count == 0:
        return gray
    largest = int(np.argmax(ndimage.sum(bright, labels, range(1, count + 1)))) + 1
    rows, cols = ndimage.find_objects(labels)[largest - 1]
    return gray[rows, cols]


def perceptual_hash(gray: np.ndarray) -> np.ndarray:
    """256-bit pHash (imagehash) of the body-trimmed image, packed into 32 bytes."""
    bits = imagehash.phash(Image.fromarray(trim_to_body(gray)), hash_size=HASH_SIZE).hash
    return np.packbits(bits.reshape(-1))


@dataclass(frozen=True)
class Fingerprint:
    file_sha256: str  # the bytes: a copied file
    pixel_sha256: str  # the decoded grey pixels and shape: the same picture stored another way (PNG vs JPEG-in-.png)
    phash: np.ndarray  # packed perceptual hash
    height: int
    width: int


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """Hashes of one image, decoded with :func:`covidct.images.read_grayscale` (so JPEG bytes
    behind a .png name and every colour mode are compared as the grey picture training sees)."""
    data = Path(path).read_bytes()
    gray = read_grayscale(path)
    pixels = hashlib.sha256(f"{gray.shape}".encode() + gray.tobytes()).hexdigest()
    return Fingerprint(hashlib.sha256(data).hexdigest(), pixels, perceptual_hash(gray), gray.shape[0], gray.shape[1])


def fingerprint_images(paths: Sequence[Path], progress: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Fingerprints of ``paths``: a table (file_sha256, pixel_sha256, height, width) and the
    packed hashes as an (N, HASH_BITS / 8) uint8 array, in the order of ``paths``."""
    rows, hashes = [], np.zeros((len(paths), HASH_BITS // 8), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc=progress, unit="image", disable=progress is None)):
        fp = fingerprint(path)
        rows.append(
            {"file_sha256": fp.file_sha256, "pixel_sha256": fp.pixel_sha256, "height": fp.height, "width": fp.width}
        )
        hashes[i] = fp.phash
    return pd.DataFrame(rows, columns=["file_sha256", "pixel_sha256", "height", "width"]), hashes


def hamming_distances(hashes: np.ndarray, block: int = 256) -> np.ndarray:
    """All pairwise Hamming distances (N, N) between packed hashes, a block of rows at a time."""
    n = len(hashes)
    out = np.zeros((n, n), dtype=np.uint16)
    for start in range(0, n, block):
        xor = hashes[start : start + block, None, :] ^ hashes[None, :, :]
        out[start : start + block] = np.bitwise_count(xor).sum(axis=-1, dtype=np.uint16)
    return out
