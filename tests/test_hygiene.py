"""Tests for covidct.hygiene and the audit_data stage: real images from the shared data and
copies the tests make of them (re-encoded, resized, cropped, padded), real patient meta files,
and the stage's exit status and one-line message on a real leak."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidct.config import AuditConfig, ConfigError, load_params
from covidct.datasets import DatasetError
from covidct.hygiene.audit import LeakageError, audit_dataset, leak_message
from covidct.hygiene.fingerprints import HASH_BITS, fingerprint_images, hamming_distances, perceptual_hash, trim_to_body
from covidct.hygiene.pairs import IDENTICAL_FILE, IDENTICAL_PIXELS, NEAR_DUPLICATE, KeypointMatcher, cross_split_pairs
from covidct.hygiene.patients import covid_ct_patients, linked_patients, lung_patients
from covidct.images import read_grayscale
from covidct.stages import audit_data
from helpers.paths import DATA, REPO

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

COVID = DATA / "covid-ct"
LUNG = DATA / "lung-seg"
CC = DATA / "cc-ccii"
SARS = DATA / "sars-cov-2-ct"
JPEG_IN_PNG = "CT_COVID/2020.03.16.20035105-p6-64-1.png"  # JPEG bytes behind a .png name
OTHERS = [
    "CT_COVID/kjr-21-e25-p1-6.png",
    "CT_NonCOVID/1335.png",
    "CT_NonCOVID/0.jpg",
    "CT_NonCOVID/10%0.jpg",
    "CT_COVID/2020.03.16.20035105-p6-64-2.png",
]
KNOWN_PAIR = (
    "CT_NonCOVID/71%0.jpg",
    "CT_COVID/kjr-21-e24-p5-29.png",
)  # the same figure, NonCOVID in train, COVID in test
SAME_PATIENT = ("CT_NonCOVID/71%0.jpg", "CT_NonCOVID/71%1.jpg")  # crawled_patient_71, two different slices
LUNG_SLICES = [
    "images/coronacases_001_000.png",
    "images/coronacases_002_000.png",
    "images/radiopaedia_4_85506_1_000.png",
]
THRESHOLDS = {"near_duplicate_distance": 32, "verify_distance": 88, "min_keypoint_inliers": 100}


def _table(entries: list[tuple[Path, str, str, Any]]) -> pd.DataFrame:
    """(path, relpath, split, label) rows as the image table audit_dataset takes (patient unknown)."""
    return pd.DataFrame(
        [{"relpath": r, "path": str(p), "split": s, "label": lab, "patient_id": None} for p, r, s, lab in entries]
    )


def _pairs(images: pd.DataFrame) -> pd.DataFrame:
    images = images.reset_index(drop=True)
    table, hashes = fingerprint_images([Path(p) for p in images["path"]])
    return cross_split_pairs(pd.concat([images, table], axis=1), hamming_distances(hashes), *THRESHOLDS.values())


def _save_variant(source: Path, dest: Path, kind: str) -> Path:
    """A copy of a real image as someone may have re-published it."""
    gray = read_grayscale(source)
    h, w = gray.shape
    if kind == "jpeg_resized":  # re-encoded as JPEG at 90 % size
        Image.fromarray(gray).resize((w * 9 // 10, h * 9 // 10), Image.Resampling.BILINEAR).save(
            dest, "JPEG", quality=70
        )
    elif kind == "cropped":  # 4 % cut off every side, into the body: pHash alone cannot see it
        Image.fromarray(gray[h // 25 : h - h // 25, w // 25 : w - w // 25]).save(dest, "JPEG", quality=80)
    elif kind == "padded":  # a looser crop of the figure: black margin added
        Image.fromarray(np.pad(gray, ((h // 8, h // 8), (w // 8, w // 8)))).save(dest, "PNG")
    elif kind == "png_of_pixels":  # the decoded pixels stored losslessly in another format
        Image.fromarray(gray).save(dest, "PNG")
    else:
        raise ValueError(kind)
    return dest


# ---------------------------------------------------------------- hashes


def test_hamming_distances_match_imagehash() -> None:
    grays = [read_grayscale(COVID / name) for name in [JPEG_IN_PNG, *OTHERS[:3]]]
    distances = hamming_distances(np.stack([perceptual_hash(g) for g in grays]))
    hashes = [imagehash.phash(Image.fromarray(trim_to_body(g)), hash_size=16) for g in grays]
    expected = np.array([[a - b for b in hashes] for a in hashes])
    np.testing.assert_array_equal(distances, expected)
    assert distances.diagonal().sum() == 0 and HASH_BITS == 256


def test_trim_to_body_drops_black_margin() -> None:
    gray = read_grayscale(COVID / OTHERS[0])
    padded = np.pad(gray, 40)
    assert trim_to_body(padded).shape == trim_to_body(gray).shape


@pytest.mark.parametrize("kind", ["jpeg_resized", "cropped", "padded"])
def test_copy_of_real_image_is_near_duplicate(tmp_path: Path, kind: str) -> None:
    source = COVID / JPEG_IN_PNG if kind != "cropped" else COVID / OTHERS[0]
    copy_path = _save_variant(source, tmp_path / f"copy.{'png' if kind == 'padded' else 'jpg'}", kind)
    pairs = _pairs(_table([(source, "original", "train", 1), (copy_path, "copy", "test", 1)]))
    [pair] = pairs.itertuples()
    assert pair.kind == NEAR_DUPLICATE
    if kind == "cropped":  # found by keypoints, not by the pHash threshold
        assert (
            pair.distance > THRESHOLDS["near_duplicate_distance"] and pair.inliers >= THRESHOLDS["min_keypoint_inliers"]
        )
    else:
        assert pair.distance <= 8


def test_identical_file_and_identical_pixels(tmp_path: Path) -> None:
    source = COVID / JPEG_IN_PNG
    shutil.copy2(source, tmp_path / "same_bytes.png")
    _save_variant(source, tmp_path / "same_pixels.png", "png_of_pixels")
    pairs = _pairs(
        _table(
            [
                (source, "a", "train", 1),
                (tmp_path / "same_bytes.png", "b", "val", 1),
                (tmp_path / "same_pixels.png", "c", "test", 1),
            ]
        )
    )
    kinds = {(r.relpath_a, r.relpath_b): r.kind for r in pairs.itertuples()}
    assert kinds[("a", "b")] == IDENTICAL_FILE
    assert kinds[("a", "c")] == IDENTICAL_PIXELS and kinds[("b", "c")] == IDENTICAL_PIXELS


# Real pairs that are close yet not the same picture (measured pHash distance, keypoint inliers): neighbouring
# slices or a follow-up scan of one patient, and two lung-set patients. The thresholds must leave them alone.
HARD_NEGATIVES = [
    (COVID, "CT_NonCOVID/1920.png", "CT_NonCOVID/1919.png"),  # 46, consecutive slices
    (
        COVID,
        "CT_COVID/2020.03.12.20034686-p17-91-4.png",
        "CT_COVID/2020.03.12.20034686-p17-91-2.png",
    ),  # 52, "Pt 2" twice
    (
        COVID,
        "CT_COVID/2020.03.13.20035212-p23-153.png",
        "CT_COVID/2020.03.13.20035212-p23-157.png",
    ),  # 84, 54 inliers, follow-up
    (LUNG, "images/radiopaedia_10_85902_1_009.png", "images/radiopaedia_4_85506_1_010.png"),  # 76, two patients
]


@pytest.mark.parametrize(
    ("root", "a", "b"), HARD_NEGATIVES, ids=["neighbour-slices", "same-patient-figure", "follow-up", "lung-patients"]
)
def test_close_but_different_real_images_are_not_duplicates(root: Path, a: str, b: str) -> None:
    [pair] = _pairs(_table([(root / a, a, "train", None), (root / b, b, "test", None)])).itertuples()
    assert pair.kind == ""
    assert THRESHOLDS["near_duplicate_distance"] < pair.distance <= THRESHOLDS["verify_distance"]
    assert 0 <= pair.inliers < THRESHOLDS["min_keypoint_inliers"]


def test_unrelated_real_images_are_not_compared() -> None:
    names = [JPEG_IN_PNG, *OTHERS, *LUNG_SLICES]
    roots = [COVID] * (1 + len(OTHERS)) + [LUNG] * len(LUNG_SLICES)
    splits = ["train", "val", "test"] * 3
    assert _pairs(
        _table([(root / n, n, splits[i], None) for i, (root, n) in enumerate(zip(roots, names, strict=True))])
    ).empty


def test_same_split_copies_are_not_cross_split_pairs(tmp_path: Path) -> None:
    copy_path = _save_variant(COVID / JPEG_IN_PNG, tmp_path / "copy.jpg", "jpeg_resized")
    assert _pairs(_table([(COVID / JPEG_IN_PNG, "a", "train", 1), (copy_path, "b", "train", 1)])).empty


def test_keypoints_separate_same_picture_from_neighbouring_slice() -> None:
    matcher = KeypointMatcher()
    assert matcher.inliers(COVID / KNOWN_PAIR[0], COVID / KNOWN_PAIR[1]) >= 200  # measured 650
    assert matcher.inliers(COVID / SAME_PATIENT[0], COVID / SAME_PATIENT[1]) < 100


# ---------------------------------------------------------------- the real known duplicate and its verdict


@pytest.fixture(scope="module")
def known_pair_audit() -> Any:
    images = _table(
        [(COVID / KNOWN_PAIR[0], KNOWN_PAIR[0], "train", 0), (COVID / KNOWN_PAIR[1], KNOWN_PAIR[1], "test", 1)]
    )
    return audit_dataset("covid-ct", images, **THRESHOLDS)


def test_real_duplicate_with_conflicting_labels_is_found(known_pair_audit: Any) -> None:
    [pair] = known_pair_audit.duplicates.itertuples()
    assert (pair.relpath_a, pair.relpath_b, pair.kind) == (*KNOWN_PAIR, NEAR_DUPLICATE)
    assert pair.distance == 10 and not pair.allowed
    summary = known_pair_audit.summary()
    assert summary["near_duplicate_pairs"] == 1 and summary["duplicate_pairs_with_conflicting_labels"] == 1
    message = leak_message([known_pair_audit], allow_patient_overlap=False, allow_duplicates=False)
    assert message and "\n" not in message
    assert (
        "covid-ct: 1 duplicate image pair(s)" in message
        and KNOWN_PAIR[0] in message
        and "audit.allowed_pairs" in message
    )
    assert leak_message([known_pair_audit], allow_patient_overlap=False, allow_duplicates=True) is None


def test_allowed_pair_passes_in_either_order() -> None:
    images = _table(
        [(COVID / KNOWN_PAIR[0], KNOWN_PAIR[0], "train", 0), (COVID / KNOWN_PAIR[1], KNOWN_PAIR[1], "test", 1)]
    )
    audit = audit_dataset("covid-ct", images, **THRESHOLDS, allowed_pairs=[KNOWN_PAIR[::-1]])
    assert audit.duplicates["allowed"].all() and audit.summary()["duplicate_pairs_not_allowed"] == 0
    assert leak_message([audit], False, False) is None


def test_stale_allowed_pair_is_noted() -> None:
    images = _table(
        [(COVID / SAME_PATIENT[0], SAME_PATIENT[0], "train", 0), (COVID / SAME_PATIENT[1], SAME_PATIENT[1], "test", 0)]
    )
    audit = audit_dataset("covid-ct", images, **THRESHOLDS, allowed_pairs=[SAME_PATIENT])
    assert audit.duplicates.empty and any("no longer a duplicate" in note for note in audit.notes)


# ---------------------------------------------------------------- patients


def test_covid_ct_patients_cover_every_real_image() -> None:
    patients = covid_ct_patients(COVID)
    files = {f"{d.name}/{f.name}" for d in (COVID / "CT_COVID", COVID / "CT_NonCOVID") for f in d.iterdir()}
    assert files <= set(patients["relpath"])  # 83 meta names without .png are matched on the stem
    by_relpath = patients.set_index("relpath")["patient_id"]
    assert by_relpath[SAME_PATIENT[0]] == by_relpath[SAME_PATIENT[1]] == "crawled_patient_71"
    assert by_relpath["CT_COVID/2020.01.24.919183-p27-132.png"] == "Patient 1"


def test_patient_in_two_splits_is_a_leak() -> None:
    images = _table(
        [(COVID / SAME_PATIENT[0], SAME_PATIENT[0], "train", 0), (COVID / SAME_PATIENT[1], SAME_PATIENT[1], "test", 0)]
    )
    images["patient_id"] = "crawled_patient_71"
    audit = audit_dataset("covid-ct", images, **THRESHOLDS)
    assert audit.patients.to_dict("records") == [
        {"patient_id": "crawled_patient_71", "splits": "train+test", "images": "train 1; test 1"}
    ]
    message = leak_message([audit], allow_patient_overlap=False, allow_duplicates=False)
    assert message == (
        "split leakage: covid-ct: 1 patient(s) in more than one split (e.g. crawled_patient_71 in train+test). See reports/audit/report.md; "
        "accept known pairs in params.yaml audit.allowed_pairs, or set audit.allow_patient_overlap / audit.allow_duplicates"
    )
    assert leak_message([audit], allow_patient_overlap=True, allow_duplicates=False) is None


def test_lung_patients_come_from_the_manifest() -> None:
    manifest = pd.read_csv(LUNG / "manifest.csv")
    split = pd.DataFrame(
        {
            "id": ["coronacases_001_000", "coronacases_002_000"],
            "patient_id": ["edited", "edited"],
            "split": ["train", "test"],
        }
    )
    split["image"] = "images/" + split["id"] + ".png"
    assert list(lung_patients(split, manifest)["patient_id"]) == ["coronacases_001", "coronacases_002"]
    split.loc[1, "id"] = "no_such_slice"
    with pytest.raises(DatasetError, match="no_such_slice"):
        lung_patients(split, manifest)


# ---------------------------------------------------------------- config


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return load_params(REPO / "params.yaml")


def _audit_params(params: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(params)
    out["audit"].update(changes)
    return out


def test_repo_audit_section(params: dict[str, Any]) -> None:
    config = AuditConfig.of(params)
    assert not config.allow_patient_overlap and not config.allow_duplicates  # a leak fails the pipeline
    assert KNOWN_PAIR[::-1] in config.allowed_pairs or KNOWN_PAIR in config.allowed_pairs


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("near_duplicate_distance", 128, "audit.near_duplicate_distance"),
        ("near_duplicate_distance", -1, "audit.near_duplicate_distance"),
        ("near_duplicate_distance", 2.5, "audit.near_duplicate_distance"),
        ("verify_distance", 10, "audit.verify_distance"),  # below near_duplicate_distance
        ("min_keypoint_inliers", 5, "audit.min_keypoint_inliers"),
        ("allow_duplicates", "no", "audit.allow_duplicates"),
        ("allowed_pairs", "a.png", "audit.allowed_pairs"),
        ("allowed_pairs", [["a.png"]], "audit.allowed_pairs[0]"),
        ("allowed_pairs", [["a.png", "a.png"]], "audit.allowed_pairs[0]"),
        ("allowed_pairs", [["a.png", 3]], "audit.allowed_pairs[0]"),
        ("allow_everything", True, "audit.allow_everything"),
    ],
)
def test_bad_audit_value_names_key(params: dict[str, Any], key: str, value: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuditConfig.of(_audit_params(params, **{key: value}))
    assert named in str(info.value)


# ---------------------------------------------------------------- the stage on a small real copy


#: CC-CCII files one scan under two ids: CP_1775's slice 39 and CP_3636's slice 199 are 2 pHash bits apart.
CC_SAME_SCAN = ("images/CP/CP_1775_3530_0039.png", "images/CP/CP_3636_5595_0199.png")
CLEAN_SARS = [
    ("images/covid_0002.png", "train"),
    ("images/noncovid_0400.png", "val"),
    ("images/covid_0520.png", "test"),
]
CLEAN_CC = [
    ("images/NCP/NCP_1001_2559_0046.png", "train"),
    ("images/Normal/Normal_1703_960_0027.png", "val"),
    ("images/CP/CP_1075_3119_0009.png", "test"),
]


def _link_source(raw: Path, splits: Path, name: str, data: Path, rows: list[tuple[str, str]], table: dict) -> None:
    """A declared source's files (links to real ones) and its split table, as prepare_data writes it."""
    for relpath, _ in rows:
        (raw / name / relpath).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data / relpath, raw / name / relpath)
    frame = pd.DataFrame({"relpath": [r for r, _ in rows], "split": [s for _, s in rows]} | table)
    frame.to_csv(splits / f"{name.replace('-', '_')}.csv", index=False)


def _stage_root(
    tmp: Path,
    covid_rows: list[tuple[str, str]],
    lung_rows: list[tuple[str, str]],
    cc_rows: list[tuple[str, str]] = CLEAN_CC,
    sars_rows: list[tuple[str, str]] = CLEAN_SARS,
) -> Path:
    """A repository root with data/raw (links to real files, real meta) and data/splits for a few images."""
    raw, splits = tmp / "data" / "raw", tmp / "data" / "splits"
    splits.mkdir(parents=True)
    shutil.copytree(COVID / "meta", raw / "covid-ct" / "meta")
    ids = covid_ct_patients(COVID).drop_duplicates("relpath").set_index("relpath")["patient_id"]
    covid = [r for r, _ in covid_rows]
    patients = [ids.get(r, r) for r in covid]
    subclass = [r.split("/")[0] for r in covid]
    labels = [int(c == "CT_COVID") for c in subclass]
    table = {"label": labels, "patient": patients, "scan": patients, "subclass": subclass}
    _link_source(raw, splits, "covid-ct", COVID, covid_rows, table)
    (raw / "lung-seg" / "images").mkdir(parents=True)
    shutil.copy2(LUNG / "manifest.csv", raw / "lung-seg" / "manifest.csv")
    for relpath, _ in lung_rows:
        os.symlink(LUNG / relpath, raw / "lung-seg" / relpath)
    lung_ids = [Path(r).stem for r, _ in lung_rows]
    lung = pd.DataFrame(
        {"id": lung_ids, "patient_id": "x", "split": [s for _, s in lung_rows], "image": [r for r, _ in lung_rows]}
    )
    lung.assign(mask="").to_csv(splits / "lung_seg.csv", index=False)
    patients = ["_".join(Path(r).stem.split("_")[:2]) for r, _ in cc_rows]
    subclass = [Path(r).parent.name for r, _ in cc_rows]
    table = {"label": [int(c == "NCP") for c in subclass], "patient": patients, "scan": patients, "subclass": subclass}
    _link_source(raw, splits, "cc-ccii", CC, cc_rows, table)
    scans = [f"S{i}" for i in range(len(sars_rows))]
    subclass = ["COVID" if "/covid_" in r else "non-COVID" for r, _ in sars_rows]
    table = {"label": [int(c == "COVID") for c in subclass], "patient": scans, "scan": scans, "subclass": subclass}
    _link_source(raw, splits, "sars-cov-2-ct", SARS, sars_rows, table)
    return tmp


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the stage tests: creating its tables takes seconds, so it is made once."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_db: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "covidct-test")
    monkeypatch.setenv("COVIDCT_PIPELINE_RUN", "audit-test")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))


CLEAN_COVID = [(OTHERS[0], "train"), (OTHERS[1], "val"), (JPEG_IN_PNG, "test")]
CLEAN_LUNG = [(LUNG_SLICES[0], "train"), (LUNG_SLICES[1], "val"), (LUNG_SLICES[2], "test")]


def test_stage_passes_and_reports(tmp_path: Path, params: dict[str, Any], mlflow_store: None) -> None:
    root = _stage_root(tmp_path / "repo", CLEAN_COVID + [(KNOWN_PAIR[0], "train"), (KNOWN_PAIR[1], "test")], CLEAN_LUNG)
    audit_data.run(params, root)  # the repo's params allow the known pair
    report = json.loads((root / "reports/audit/report.json").read_text())
    assert report["passed"] is True
    assert report["covid-ct"]["near_duplicate_pairs"] == 1 and report["covid-ct"]["duplicate_pairs_allowed"] == 1
    assert report["lung-seg"]["patient_overlap"] == 0 and report["lung-seg"]["images"] == 3
    assert report["details"]["covid-ct"]["duplicates"][0]["relpath_b"] == KNOWN_PAIR[1]
    text = (root / "reports/audit/report.md").read_text()
    assert "**Passed**" in text and KNOWN_PAIR[1] in text
    with Image.open(root / "reports/audit/pairs.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_stage_fails_on_patient_in_two_splits(tmp_path: Path, params: dict[str, Any], mlflow_store: None) -> None:
    lung = CLEAN_LUNG + [
        ("images/coronacases_001_112.png", "test")
    ]  # coronacases_001 is also in train (a slice far from it)
    root = _stage_root(tmp_path / "repo", CLEAN_COVID, lung)
    with pytest.raises(
        LeakageError, match=r"lung-seg: 1 patient\(s\) in more than one split \(e.g. coronacases_001 in train\+test\)"
    ):
        audit_data.run(params, root)
    report = json.loads((root / "reports/audit/report.json").read_text())  # written before failing, to be read
    assert (
        report["passed"] is False
        and report["details"]["lung-seg"]["patient_overlap"][0]["patient_id"] == "coronacases_001"
    )
    assert "FAILED" in (root / "reports/audit/report.md").read_text()
    audit_data.run(_audit_params(params, allow_patient_overlap=True), root)
    assert json.loads((root / "reports/audit/report.json").read_text())["passed"] is True


def test_entry_point_exits_with_one_line(tmp_path: Path, params: dict[str, Any], mlflow_db: str) -> None:
    root = _stage_root(tmp_path / "repo", CLEAN_COVID + [(KNOWN_PAIR[0], "train"), (KNOWN_PAIR[1], "test")], CLEAN_LUNG)
    strict = _audit_params(params, allowed_pairs=[])
    (root / "params.yaml").write_text(json.dumps(strict), encoding="utf-8")  # JSON is YAML
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_db,
        "COVIDCT_PIPELINE_RUN": "audit-test",
        "PYTHONPATH": str(REPO / "src"),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines/audit_data.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert (
        f"covid-ct: 1 duplicate image pair(s) across splits (e.g. {KNOWN_PAIR[0]} [train] ~ {KNOWN_PAIR[1]} [test], near-duplicate"
        in errors[0]
    )


def test_stage_fails_on_one_cc_ccii_scan_under_two_ids_in_two_splits(
    tmp_path: Path, params: dict[str, Any], mlflow_store: None
) -> None:
    root = _stage_root(
        tmp_path / "repo", CLEAN_COVID, CLEAN_LUNG, [*CLEAN_CC, (CC_SAME_SCAN[0], "train"), (CC_SAME_SCAN[1], "test")]
    )
    with pytest.raises(LeakageError, match="cc-ccii"):
        audit_data.run(params, root)
    report = json.loads((root / "reports/audit/report.json").read_text())
    assert report["cc-ccii"]["near_duplicate_pairs"] == 1 and report["cc-ccii"]["patient_overlap"] == 0
    assert {report["details"]["cc-ccii"]["duplicates"][0][k] for k in ("relpath_a", "relpath_b")} == set(CC_SAME_SCAN)


def test_stage_fails_on_one_picture_in_two_sources(tmp_path: Path, params: dict[str, Any], mlflow_store: None) -> None:
    """A slice that two sources both hold would sit on both sides of a leave-one-source-out fold."""
    root = _stage_root(tmp_path / "repo", CLEAN_COVID, CLEAN_LUNG)
    shared = root / "data" / "raw" / "sars-cov-2-ct" / "images" / "noncovid_0400.png"
    shared.unlink()
    shutil.copy2(CC / CLEAN_CC[0][0], shared)  # SARS-CoV-2 CT's val slice is CC-CCII's train slice
    with pytest.raises(LeakageError, match="across sources: 1 duplicate image pair"):
        audit_data.run(params, root)
    report = json.loads((root / "reports/audit/report.json").read_text())
    pair = report["details"]["across sources"]["duplicates"][0]
    assert {pair["relpath_a"], pair["relpath_b"]} == {
        f"cc-ccii/{CLEAN_CC[0][0]}",
        "sars-cov-2-ct/images/noncovid_0400.png",
    }


def test_linked_patients_join_ids_that_hold_one_scan_and_nothing_else() -> None:
    files = [*CC_SAME_SCAN, *(r for r, _ in CLEAN_CC)]
    _, hashes = fingerprint_images([CC / f for f in files])
    patients = ["_".join(Path(f).stem.split("_")[:2]) for f in files]
    groups = linked_patients(patients, hashes, distance=24)
    assert groups["CP_1775"] == groups["CP_3636"] == "CP_1775+CP_3636"
    assert all(groups[p] == p for p in patients[2:])
    assert linked_patients(patients, hashes, distance=1)["CP_1775"] == "CP_1775"  # 2 bits apart: not linked below that
