"""Split hygiene: is anything of the validation or test split already in training?

Two kinds of leak make a held-out score look better (or, with a conflicting label, worse)
than it is: one patient on both sides of a split, and one picture on both sides. COVID-CT
was scraped from paper figures, so the same picture can sit in two papers, or in both
classes. This module finds both: patients from the ids the datasets ship, pictures from
their content (a byte hash, a hash of the decoded pixels, and a perceptual hash whose
close pairs are confirmed by keypoints that agree on one crop-and-scale transform).

Measured on the real data (see ``reports/audit/report.md``):

* pHash must be taken on the image **trimmed to the body**: padding a picture with 10 %
  black border moves the 256-bit pHash of the untrimmed image by 46-154 bits, of the
  trimmed one by 0-8.
* The 64-bit pHash cannot separate: two different COVID-CT images are 6 bits apart, as
  close as a true duplicate. The 256-bit one puts the same picture at 10-24 bits and the
  nearest different picture at 46, unrelated lung-set slices at 66 and more.
* A crop into the body is beyond any pHash threshold (a cropped copy of a COVID-CT figure
  sits at 40, between two same-patient slices at 46-52); ORB keypoints agreeing on one
  similarity transform (RANSAC) separate it: 241-655 inliers for the same picture, at most
  54 for anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from covidct.atomic import atomic_path
from covidct.datasets import SPLITS, DatasetError
from covidct.images import read_grayscale

HASH_SIZE = 16  # pHash of 16 x 16 DCT coefficients: 256 bits (the 64-bit default cannot separate; see module doc)
HASH_BITS = HASH_SIZE * HASH_SIZE
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


class LeakageError(DatasetError):
    """A patient or a picture in more than one split that params.yaml does not allow; the message names it."""


# ---------------------------------------------------------------- image fingerprints


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


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: column {missing[0]!r} is missing (has: {', '.join(map(str, frame.columns))})")
    return frame


def covid_ct_patients(root: Path) -> pd.DataFrame:
    """Patient id of every COVID-CT image (relpath, patient_id) from the meta files the dataset ships.

    ``meta/COVID-CT-MetaInfo.xlsx`` names COVID images, 83 of them without their ``.png``,
    so it is matched on the file stem; ``meta/NonCOVID-CT-MetaInfo.csv`` names NonCOVID images.
    """
    covid_meta, noncovid_meta = root / "meta" / "COVID-CT-MetaInfo.xlsx", root / "meta" / "NonCOVID-CT-MetaInfo.csv"
    for path in (covid_meta, noncovid_meta):
        if not path.is_file():
            raise DatasetError(f"{path}: patient meta file not found")
    # A row without a patient id is dropped (its image counts as unknown), never read as patient "nan".
    covid = _require_columns(pd.read_excel(covid_meta), ["File name", "Patient ID"], covid_meta).dropna(
        subset=["File name", "Patient ID"]
    )
    covid = pd.DataFrame(
        {
            "relpath": "CT_COVID/" + covid["File name"].astype(str).str.strip().str.removesuffix(".png") + ".png",
            "patient_id": covid["Patient ID"].astype(str).str.strip(),
        }
    )
    noncovid = _require_columns(pd.read_csv(noncovid_meta), ["image name", "patient id"], noncovid_meta).dropna(
        subset=["image name", "patient id"]
    )
    noncovid = pd.DataFrame(
        {
            "relpath": "CT_NonCOVID/" + noncovid["image name"].astype(str).str.strip(),
            "patient_id": noncovid["patient id"].astype(str).str.strip(),
        }
    )
    return pd.concat([covid, noncovid], ignore_index=True)


def noncovid_split_lists(root: Path) -> pd.DataFrame:
    """The official NonCOVID patient lists ``meta/CT_NonCOVID_{split}_id.csv`` as (patient_id, split) rows."""
    frames = []
    for split in SPLITS:
        path = root / "meta" / f"CT_NonCOVID_{split}_id.csv"
        if not path.is_file():
            raise DatasetError(f"{path}: patient list not found")
        ids = _require_columns(pd.read_csv(path), ["patient id"], path)["patient id"].dropna().astype(str).str.strip()
        frames.append(pd.DataFrame({"patient_id": ids, "split": split}))
    return pd.concat(frames, ignore_index=True)


def patient_overlap(rows: pd.DataFrame) -> pd.DataFrame:
    """Patients found in more than one split: patient_id, splits ("train+test") and images per split."""
    counts = rows.dropna(subset=["patient_id"]).groupby(["patient_id", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=[s for s in SPLITS if s in counts.columns])
    shared = counts[(counts > 0).sum(axis=1) > 1]
    return pd.DataFrame(
        {
            "patient_id": shared.index.astype(str),
            "splits": ["+".join(s for s in shared.columns if row[s] > 0) for _, row in shared.iterrows()],
            "images": [
                "; ".join(f"{s} {int(row[s])}" for s in shared.columns if row[s] > 0) for _, row in shared.iterrows()
            ],
        }
    )


def linked_patients(patient_ids: Sequence[str], hashes: np.ndarray, distance: int) -> dict[str, str]:
    """Patient -> its group: two ids are one group when a slice of one is within ``distance``
    pHash bits of a slice of the other. CC-CCII files some scans under two patient ids (e.g.
    CP_1775 and CP_3636: the same slices 2 bits apart, one of them windowed differently); a
    split by id alone would put the one scan on both sides. A group is named by its ids, joined by +."""
    ids = np.asarray(patient_ids, dtype=object)
    names, index = np.unique(ids, return_inverse=True)
    first, second = np.nonzero(hamming_distances(hashes) <= distance)
    graph = sparse.coo_matrix((np.ones(len(first)), (index[first], index[second])), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[str]] = {}
    for name, c in zip(names, component, strict=True):
        members.setdefault(int(c), []).append(str(name))
    return {name: "+".join(members[int(c)]) for name, c in zip(names, component, strict=True)}


def lung_patients(split_table: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The lung split's slices with their patient taken from ``manifest.csv`` (not from the split
    table, which could have been edited); a slice the manifest does not know is an error."""
    patient_of = manifest.set_index("id")["patient_id"].astype(str)
    unknown = split_table.loc[~split_table["id"].isin(patient_of.index), "id"]
    if not unknown.empty:
        raise DatasetError(f"lung split: slice {unknown.iloc[0]!r} is not in manifest.csv ({len(unknown)} such)")
    out = split_table[["id", "image", "split"]].rename(columns={"image": "relpath"}).copy()
    out["patient_id"] = split_table["id"].map(patient_of).to_numpy()
    return out


# ---------------------------------------------------------------- one dataset's audit


@dataclass
class DatasetAudit:
    """What the audit found in one dataset; ``duplicates`` and ``patients`` are the leaks."""

    name: str
    images: pd.DataFrame  # relpath, split, label, patient_id and fingerprints
    patients: pd.DataFrame  # patients in more than one split (patient_overlap)
    duplicates: pd.DataFrame  # cross-split pairs with a kind, and whether params.yaml allows them
    closest: pd.DataFrame  # the closest cross-split pairs that are not duplicates, for a human to look at
    min_distance: int = -1  # smallest pHash distance between two splits (-1: fewer than two splits)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        by_split = self.images.groupby("split")
        unallowed = self.duplicates[~self.duplicates["allowed"]] if len(self.duplicates) else self.duplicates
        known = self.images["patient_id"].notna()
        labels_differ = (
            self.duplicates["label_a"].astype(str) != self.duplicates["label_b"].astype(str)
            if len(self.duplicates)
            else []
        )
        return {
            "images": len(self.images),
            "images_per_split": {s: int(by_split.size().get(s, 0)) for s in SPLITS},
            "patients": int(self.images["patient_id"].nunique()),
            "patients_per_split": {s: int(by_split["patient_id"].nunique().get(s, 0)) for s in SPLITS},
            "images_without_patient_id": int((~known).sum()),
            "patient_overlap": len(self.patients),
            "identical_file_pairs": int((self.duplicates["kind"] == IDENTICAL_FILE).sum())
            if len(self.duplicates)
            else 0,
            "identical_pixel_pairs": int((self.duplicates["kind"] == IDENTICAL_PIXELS).sum())
            if len(self.duplicates)
            else 0,
            "near_duplicate_pairs": int((self.duplicates["kind"] == NEAR_DUPLICATE).sum())
            if len(self.duplicates)
            else 0,
            "duplicate_pairs_allowed": int(self.duplicates["allowed"].sum()) if len(self.duplicates) else 0,
            "duplicate_pairs_not_allowed": len(unallowed),
            "duplicate_pairs_with_conflicting_labels": int(np.sum(labels_differ)),
            "within_split_identical_images": within_split_identical(self.images),
            "min_cross_split_distance": self.min_distance,
        }


def audit_dataset(
    name: str,
    images: pd.DataFrame,
    near_duplicate_distance: int,
    verify_distance: int,
    min_keypoint_inliers: int,
    allowed_pairs: Iterable[Sequence[str]] = (),
    n_closest: int = 8,
    progress: bool = False,
) -> DatasetAudit:
    """Audit one dataset: ``images`` has relpath, path, split, label and patient_id (None where unknown)."""
    images = images.reset_index(drop=True)
    table, hashes = fingerprint_images([Path(p) for p in images["path"]], f"fingerprint {name}" if progress else None)
    images = pd.concat([images, table], axis=1)
    distances = hamming_distances(hashes)
    pairs = cross_split_pairs(
        images,
        distances,
        near_duplicate_distance,
        verify_distance,
        min_keypoint_inliers,
        progress=f"compare {name}" if progress else None,
    )
    allowed = {pair_key(*pair) for pair in allowed_pairs}
    pairs["allowed"] = [pair_key(a, b) in allowed for a, b in zip(pairs["relpath_a"], pairs["relpath_b"], strict=True)]
    duplicates = (
        pairs[pairs["kind"] != ""].sort_values(["distance", "inliers"], ascending=[True, False]).reset_index(drop=True)
    )
    # For a human to look at: the pairs keypoints found most alike, then the nearest by pHash alone.
    closest = (
        pairs[pairs["kind"] == ""]
        .sort_values(["inliers", "distance"], ascending=[False, True])
        .head(n_closest - n_closest // 3)
    )
    nearest = nearest_pairs(images, distances, n_closest - len(closest), exclude=pd.concat([duplicates, closest]))
    verified = {
        pair_key(a, b): n for a, b, n in zip(pairs["relpath_a"], pairs["relpath_b"], pairs["inliers"], strict=True)
    }
    nearest["inliers"] = [
        verified.get(pair_key(a, b), -1) for a, b in zip(nearest["relpath_a"], nearest["relpath_b"], strict=True)
    ]
    closest = pd.concat([closest, nearest], ignore_index=True) if len(nearest) else closest.reset_index(drop=True)
    cross = images["split"].to_numpy()[:, None] != images["split"].to_numpy()[None, :]
    min_distance = int(distances[cross].min()) if cross.any() else -1
    audit = DatasetAudit(
        name, images.drop(columns=["path"]), patient_overlap(images), duplicates, closest, min_distance
    )
    present = {pair_key(a, b) for a, b in zip(pairs["relpath_a"], pairs["relpath_b"], strict=True)}
    relpaths = set(images["relpath"])
    for pair in allowed:
        if pair <= relpaths and pair not in present:
            audit.notes.append(
                f"allowed pair {' ~ '.join(sorted(pair))} is no longer a duplicate; it can leave audit.allowed_pairs"
            )
    return audit


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


def leak_message(audits: Sequence[DatasetAudit], allow_patient_overlap: bool, allow_duplicates: bool) -> str | None:
    """One line naming what leaked and how to accept it, or None when nothing unallowed leaked."""
    parts = []
    for audit in audits:
        if len(audit.patients) and not allow_patient_overlap:
            first = audit.patients.iloc[0]
            parts.append(
                f"{audit.name}: {len(audit.patients)} patient(s) in more than one split (e.g. {first['patient_id']} in {first['splits']})"
            )
        unallowed = audit.duplicates[~audit.duplicates["allowed"]] if len(audit.duplicates) else audit.duplicates
        if len(unallowed) and not allow_duplicates:
            first = unallowed.iloc[0]
            parts.append(
                f"{audit.name}: {len(unallowed)} duplicate image pair(s) across splits (e.g. {first['relpath_a']} [{first['split_a']}] ~ "
                f"{first['relpath_b']} [{first['split_b']}], {first['kind']}, pHash distance {first['distance']})"
            )
    if not parts:
        return None
    return (
        "split leakage: "
        + "; ".join(parts)
        + ". See reports/audit/report.md; accept known pairs in params.yaml audit.allowed_pairs, or set audit.allow_patient_overlap / audit.allow_duplicates"
    )


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def report_json(audits: Sequence[DatasetAudit], passed: bool) -> dict[str, Any]:
    """The machine-readable report: a numeric summary per dataset (what ``dvc metrics`` shows) and the pairs.

    Training stages depend on this file, so it holds only findings: no timing and no settings
    (dvc.lock has those), and an unchanged audit result leaves it byte-identical.
    """
    return {
        "passed": passed,
        **{audit.name: audit.summary() for audit in audits},
        "details": {
            audit.name: {
                "patient_overlap": _records(audit.patients),
                "duplicates": _records(audit.duplicates),
                "closest_not_flagged": _records(audit.closest),
                "notes": audit.notes,
            }
            for audit in audits
        },
    }


def _pair_table(frame: pd.DataFrame, with_kind: bool) -> list[str]:
    head = "| split a | image a | label a | split b | image b | label b | pHash distance | keypoint inliers |" + (
        " kind | allowed |" if with_kind else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in frame.itertuples():
        inliers = "-" if row.inliers < 0 else str(row.inliers)
        cells = [
            row.split_a,
            f"`{row.relpath_a}`",
            _label(row.label_a),
            row.split_b,
            f"`{row.relpath_b}`",
            _label(row.label_b),
            str(row.distance),
            inliers,
        ]
        if with_kind:
            cells += [row.kind, "yes" if row.allowed else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _label(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def report_markdown(
    audits: Sequence[DatasetAudit], settings: Mapping[str, Any], verdict: str | None, seconds: float, image_name: str
) -> str:
    """A readable report: the verdict, per-dataset counts, every duplicate pair and the closest others."""
    lines = [
        "# Data audit: splits before training",
        "",
        f"**{'FAILED: ' + verdict if verdict else 'Passed'}**",
        "",
        f"Audit time {seconds:.1f} s. Settings (params.yaml `audit`): "
        + ", ".join(
            f"`{k}` = {v if not isinstance(v, (list, tuple)) else f'{len(v)} pair(s)'}" for k, v in settings.items()
        )
        + ".",
        "",
        f"Near-duplicates: pHash ({HASH_BITS} bits, imagehash) of each image decoded to grey and trimmed to the body; a pair within "
        f"`near_duplicate_distance` bits is the same picture, and a pair within `verify_distance` bits is the same picture when at least "
        f"`min_keypoint_inliers` ORB keypoints agree on one crop-and-scale transform. Identical bytes or decoded pixels always count.",
        "",
        "| | " + " | ".join(a.name for a in audits) + " |",
        "|---|" + "---:|" * len(audits),
    ]
    summaries = [a.summary() for a in audits]
    for key in summaries[0] if summaries else []:
        values = [
            s[key] if not isinstance(s[key], dict) else " / ".join(str(v) for v in s[key].values()) for s in summaries
        ]
        lines.append(
            f"| {key.replace('_', ' ')}{' (train / val / test)' if isinstance(summaries[0][key], dict) else ''} | "
            + " | ".join(map(str, values))
            + " |"
        )
    for audit in audits:
        lines += ["", f"## {audit.name}", ""]
        if len(audit.patients):
            lines += ["Patients in more than one split:", "", "| patient | splits | images |", "|---|---|---|"]
            lines += [f"| {r.patient_id} | {r.splits} | {r.images} |" for r in audit.patients.itertuples()]
        else:
            lines.append("No patient id is in more than one split.")
        lines.append("")
        if len(audit.duplicates):
            lines += ["Duplicate pictures across splits:", ""] + _pair_table(audit.duplicates, with_kind=True)
        else:
            lines.append("No duplicate picture across splits.")
        if len(audit.closest):
            lines += [
                "",
                "Closest cross-split pairs that are **not** counted as duplicates (most keypoint inliers first), for a human to look at:",
                "",
            ]
            lines += _pair_table(audit.closest, with_kind=False)
        if audit.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in audit.notes]
    lines += ["", f"![duplicates and closest pairs]({image_name})", ""]
    return "\n".join(lines)


def save_pair_gallery(
    pairs: Sequence[tuple[Path, Path, str, str]], path: str | os.PathLike[str], max_side: int = 256
) -> None:
    """One row per pair: both images side by side, each with its caption, and the pair's title on the left tile.

    ``pairs`` holds (image a, image b, caption a, caption b); written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, len(pairs))
    dpi = 100
    cell = max_side / dpi
    fig = Figure(figsize=(2 * cell, rows * (0.8 * cell + 0.35)), dpi=dpi)
    FigureCanvasAgg(fig)
    if not pairs:
        fig.text(0.5, 0.5, "no cross-split pair to show", ha="center", va="center")
    for r, (a, b, caption_a, caption_b) in enumerate(pairs):
        for c, (image, caption) in enumerate(((a, caption_a), (b, caption_b))):
            ax = fig.add_subplot(rows, 2, 2 * r + c + 1)
            ax.set_axis_off()
            ax.imshow(read_grayscale(image), cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            ax.set_title(caption, fontsize=6.5)
    fig.tight_layout(pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
