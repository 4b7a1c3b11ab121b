"""The same picture on both sides of a split: identical bytes or pixels, or a close perceptual
hash confirmed by keypoints that agree on one crop-and-scale transform."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidct.datasets import SPLITS
from covidct.images import read_grayscale

KEYPOINT_SIDE = (
    384  # both images of a pair are scaled to this longer side before ORB, so scale differences do not matter
)
MAX_KEYPOINTS = 1000
RATIO_TEST = 0.75  # Lowe's ratio: a match counts only if clearly better than the second best
RANSAC_PX = 4.0  # reprojection tolerance at KEYPOINT_SIDE
SPLIT_RANK = {split: i for i, split in enumerate(SPLITS)}

NEAR_DUPLICATE = "near-duplicate"
IDENTICAL_FILE = "identical file"
IDENTICAL_PIXELS = "identical pixels"


class KeypointMatcher:
    """Counts ORB keypoints of two images that agree on one similarity transform (RANSAC).

    The same picture, however cropped, rescaled or re-encoded, keeps hundreds of them;
    two different slices keep a handful. Features are computed once per image and kept.
    """

    def __init__(self, max_keypoints: int = MAX_KEYPOINTS, side: int = KEYPOINT_SIDE) -> None:
        self._orb = cv2.ORB_create(nfeatures=max_keypoints)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._side = side
        self._features: dict[Path, tuple[np.ndarray, np.ndarray | None]] = {}

    def _features_of(self, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        if path not in self._features:
            gray = read_grayscale(path)
            scale = self._side / max(gray.shape)
            size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            keypoints, descriptors = self._orb.detectAndCompute(gray, None)
            self._features[path] = (np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors)
        return self._features[path]

    def inliers(self, a: Path, b: Path) -> int:
        (points_a, desc_a), (points_b, desc_b) = self._features_of(a), self._features_of(b)
        if desc_a is None or desc_b is None or len(points_a) < 3 or len(points_b) < 3:
            return 0
        matches = [
            m[0]
            for m in self._matcher.knnMatch(desc_a, desc_b, k=2)
            if len(m) == 2 and m[0].distance < RATIO_TEST * m[1].distance
        ]
        if len(matches) < 3:
            return 0
        src = points_a[[m.queryIdx for m in matches]]
        dst = points_b[[m.trainIdx for m in matches]]
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
        return 0 if mask is None else int(mask.sum())


# ---------------------------------------------------------------- pairs across splits


def cross_split_pairs(
    images: pd.DataFrame,
    distances: np.ndarray,
    near_duplicate_distance: int,
    verify_distance: int,
    min_keypoint_inliers: int,
    matcher: KeypointMatcher | None = None,
    progress: str | None = None,
) -> pd.DataFrame:
    """Every pair of images in different splits that is worth a look, one row each.

    ``images`` holds relpath, path, split, label and the fingerprint columns; ``distances``
    are their pairwise pHash distances (:func:`hamming_distances`). A pair is listed when its pHash distance is at most ``verify_distance``
    (its keypoint inliers are then counted) or its bytes or pixels are identical. ``kind``
    says why it is a duplicate (identical file, identical pixels, near-duplicate: distance
    at most ``near_duplicate_distance`` or at least ``min_keypoint_inliers`` inliers), or
    is empty for a pair that is merely close. Column ``a`` is the earlier split.
    """
    columns = ["relpath_a", "split_a", "label_a", "relpath_b", "split_b", "label_b", "distance", "inliers", "kind"]
    if len(images) < 2:
        return pd.DataFrame(columns=columns)
    split = images["split"].to_numpy()
    file_sha = images["file_sha256"].to_numpy()
    pixel_sha = images["pixel_sha256"].to_numpy()
    first, second = np.triu_indices(len(images), 1)
    keep = split[first] != split[second]
    first, second = first[keep], second[keep]
    same_pixels = pixel_sha[first] == pixel_sha[second]
    keep = (distances[first, second] <= verify_distance) | same_pixels | (file_sha[first] == file_sha[second])
    first, second = first[keep], second[keep]
    matcher = matcher or KeypointMatcher()
    rows = []
    for i, j in tqdm(list(zip(first, second, strict=True)), desc=progress, unit="pair", disable=progress is None):
        if SPLIT_RANK.get(split[i], 0) > SPLIT_RANK.get(split[j], 0):
            i, j = j, i
        distance = int(distances[i, j])
        inliers = (
            matcher.inliers(Path(images["path"].iat[i]), Path(images["path"].iat[j]))
            if distance <= verify_distance
            else 0
        )
        if file_sha[i] == file_sha[j]:
            kind = IDENTICAL_FILE
        elif pixel_sha[i] == pixel_sha[j]:
            kind = IDENTICAL_PIXELS
        elif distance <= near_duplicate_distance or inliers >= min_keypoint_inliers:
            kind = NEAR_DUPLICATE
        else:
            kind = ""
        rows.append(
            {
                "relpath_a": images["relpath"].iat[i],
                "split_a": split[i],
                "label_a": images["label"].iat[i],
                "relpath_b": images["relpath"].iat[j],
                "split_b": split[j],
                "label_b": images["label"].iat[j],
                "distance": distance,
                "inliers": inliers,
                "kind": kind,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def pair_key(a: str, b: str) -> frozenset[str]:
    """An unordered pair of relpaths, as params.yaml lists allowed pairs in either order."""
    return frozenset((a, b))


def within_split_identical(images: pd.DataFrame) -> int:
    """Images whose pixels repeat inside one split: not a leak, only weight given twice."""
    groups = images.groupby(["split", "pixel_sha256"]).size()
    return int((groups[groups > 1] - 1).sum())


# ---------------------------------------------------------------- patients


def nearest_pairs(images: pd.DataFrame, distances: np.ndarray, n: int, exclude: pd.DataFrame) -> pd.DataFrame:
    """The ``n`` cross-split pairs with the smallest pHash distance not already in ``exclude`` (inliers not counted: -1)."""
    if n <= 0 or len(images) < 2:
        return exclude.head(0)
    split = images["split"].to_numpy()
    first, second = np.triu_indices(len(images), 1)
    cross = split[first] != split[second]
    first, second = first[cross], second[cross]
    seen = {pair_key(a, b) for a, b in zip(exclude["relpath_a"], exclude["relpath_b"], strict=True)}
    rows = []
    for k in np.argsort(distances[first, second], kind="stable"):
        i, j = first[k], second[k]
        if SPLIT_RANK.get(split[i], 0) > SPLIT_RANK.get(split[j], 0):
            i, j = j, i
        a, b = images["relpath"].iat[i], images["relpath"].iat[j]
        if pair_key(a, b) in seen:
            continue
        rows.append(
            {
                "relpath_a": a,
                "split_a": split[i],
                "label_a": images["label"].iat[i],
                "relpath_b": b,
                "split_b": split[j],
                "label_b": images["label"].iat[j],
                "distance": int(distances[i, j]),
                "inliers": -1,
                "kind": "",
                "allowed": False,
            }
        )
        if len(rows) == n:
            break
    return pd.DataFrame(rows, columns=exclude.columns)


# ---------------------------------------------------------------- verdict and report
