"""Tests for covidct.datasets: the official COVID-CT split, checksum checks, verified copies, lung split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from covidct.datasets import (
    DatasetError,
    copy_verified,
    covid_ct_split,
    lung_split,
    read_checksums,
    verify_checksums,
)
from helpers.paths import DATA

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

COVID_CT = DATA / "covid-ct"
LUNG_SEG = DATA / "lung-seg"


# ---------------------------------------------------------------- official COVID-CT split


@pytest.fixture(scope="module")
def split() -> pd.DataFrame:
    return covid_ct_split(COVID_CT)


def test_covid_ct_split_sizes(split: pd.DataFrame) -> None:
    assert list(split.columns) == ["relpath", "label", "split"]
    assert len(split) == 746
    assert split["split"].value_counts().to_dict() == {"train": 425, "val": 118, "test": 203}
    counts = split.groupby(["split", "label"]).size().to_dict()
    assert counts == {
        ("train", 1): 191,
        ("val", 1): 60,
        ("test", 1): 98,
        ("train", 0): 234,
        ("val", 0): 58,
        ("test", 0): 105,
    }


def test_covid_ct_split_labels_follow_folder(split: pd.DataFrame) -> None:
    assert split["relpath"].is_unique
    covid = split["relpath"].str.startswith("CT_COVID/")
    noncovid = split["relpath"].str.startswith("CT_NonCOVID/")
    assert (covid | noncovid).all()
    assert (split.loc[covid, "label"] == 1).all()
    assert (split.loc[noncovid, "label"] == 0).all()
    assert all((COVID_CT / p).is_file() for p in split["relpath"].head(20))


def test_covid_ct_subset_per_class(split: pd.DataFrame) -> None:
    small = covid_ct_split(COVID_CT, subset_per_class=2)
    assert len(small) == 12
    assert small.groupby(["split", "label"]).size().to_dict() == {
        (s, lab): 2 for s in ("train", "val", "test") for lab in (0, 1)
    }
    assert set(small["relpath"]) <= set(split["relpath"])
    merged = small.merge(split, on="relpath", suffixes=("", "_full"))
    assert (merged["label"] == merged["label_full"]).all() and (merged["split"] == merged["split_full"]).all()


def _tiny_covid_ct(tmp_path: Path) -> Path:
    root = tmp_path / "covid-ct"
    for class_dir in ("CT_COVID", "CT_NonCOVID"):
        (root / class_dir).mkdir(parents=True)
    (root / "Data-split").mkdir()
    for split_name in ("train", "val", "test"):
        for class_dir in ("CT_COVID", "CT_NonCOVID"):
            name = f"{split_name}_{class_dir}.png"
            (root / class_dir / name).write_bytes(b"x")
            (root / "Data-split" / f"{split_name}{class_dir}.txt").write_text(f"{name}\n\n", encoding="utf-8")
    return root


def test_split_list_naming_missing_image(tmp_path: Path) -> None:
    root = _tiny_covid_ct(tmp_path)
    assert len(covid_ct_split(root)) == 6
    listing = root / "Data-split" / "valCT_NonCOVID.txt"
    listing.write_text("val_CT_NonCOVID.png\nghost.png\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        covid_ct_split(root)
    message = str(info.value)
    assert "valCT_NonCOVID.txt" in message
    assert "ghost.png" in message


def test_missing_split_list(tmp_path: Path) -> None:
    root = _tiny_covid_ct(tmp_path)
    (root / "Data-split" / "testCT_COVID.txt").unlink()
    with pytest.raises(DatasetError, match="testCT_COVID.txt"):
        covid_ct_split(root)


def test_image_in_two_lists(tmp_path: Path) -> None:
    root = _tiny_covid_ct(tmp_path)
    (root / "Data-split" / "valCT_COVID.txt").write_text("val_CT_COVID.png\ntrain_CT_COVID.png\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="train_CT_COVID.png"):
        covid_ct_split(root)


# ---------------------------------------------------------------- checksums and verified copies


def _fake_dataset(root: Path) -> dict[str, bytes]:
    files = {
        "a.png": b"\x89PNG fake image a",
        "sub/b.png": b"second file, in a sub folder",
        "sub/c d%1.png": b"a name with a space and a percent sign",
    }
    lines = []
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "PROVENANCE.md").write_text("where it came from\n", encoding="utf-8")
    return files


@pytest.fixture()
def fake(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    _fake_dataset(root)
    return root


def test_verify_checksums_passes(fake: Path) -> None:
    assert verify_checksums(fake) == 3
    sums = read_checksums(fake)
    assert set(sums) == {"a.png", "sub/b.png", "sub/c d%1.png"}
    assert sums["a.png"] == hashlib.sha256(b"\x89PNG fake image a").hexdigest()


def test_verify_checksums_accepts_binary_marker(fake: Path) -> None:
    sums = fake / "SHA256SUMS"
    sums.write_text(sums.read_text(encoding="utf-8").replace("  a.png", "  *a.png"), encoding="utf-8")
    assert verify_checksums(fake) == 3


def test_real_covid_ct_checksum_list_is_readable() -> None:
    sums = read_checksums(COVID_CT)
    assert len(sums) >= 746
    assert all(len(d) == 64 for d in sums.values())


def test_altered_file_named(fake: Path) -> None:
    (fake / "sub" / "b.png").write_bytes(b"second file, in a sub folder!")
    with pytest.raises(DatasetError, match=r"b\.png.*does not match"):
        verify_checksums(fake)


def test_same_size_altered_file_named(fake: Path) -> None:
    (fake / "a.png").write_bytes(b"\x89PNG fake image b")  # same length, one byte differs
    with pytest.raises(DatasetError, match=r"a\.png"):
        verify_checksums(fake)


def test_truncated_file_named(fake: Path) -> None:
    path = fake / "sub" / "c d%1.png"
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(DatasetError, match=r"c d%1\.png"):
        verify_checksums(fake)


def test_deleted_file_named(fake: Path) -> None:
    (fake / "sub" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.png.*missing"):
        verify_checksums(fake)


def test_missing_checksum_list(fake: Path) -> None:
    (fake / "SHA256SUMS").unlink()
    with pytest.raises(DatasetError, match="SHA256SUMS"):
        verify_checksums(fake)


def test_malformed_checksum_line(fake: Path) -> None:
    (fake / "SHA256SUMS").write_text("abc a.png\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"SHA256SUMS:1"):
        verify_checksums(fake)


def test_copy_verified_copies_everything(fake: Path, tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "dataset"
    dest.parent.mkdir()
    (fake / "unlisted.txt").write_text("not in SHA256SUMS", encoding="utf-8")
    assert copy_verified(fake, dest) == 3
    for name in ("a.png", "sub/b.png", "sub/c d%1.png", "SHA256SUMS", "PROVENANCE.md"):
        assert (dest / name).read_bytes() == (fake / name).read_bytes(), name
    assert not (dest / "unlisted.txt").exists()
    assert verify_checksums(dest) == 3
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dataset"]  # no temp folder left


def test_copy_verified_replaces_stale_destination(fake: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.png").write_bytes(b"old")
    copy_verified(fake, dest)
    assert not (dest / "stale.png").exists()
    assert (dest / "a.png").is_file()


@pytest.mark.parametrize("damage", ["alter", "truncate", "delete", "no_sums"])
def test_copy_verified_failure_leaves_no_destination(fake: Path, tmp_path: Path, damage: str) -> None:
    target = fake / "sub" / "b.png"
    if damage == "alter":
        target.write_bytes(b"edited")
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:3])
    elif damage == "delete":
        target.unlink()
    else:
        (fake / "SHA256SUMS").unlink()

    fresh = tmp_path / "fresh"
    with pytest.raises(DatasetError):
        copy_verified(fake, fresh)
    assert not fresh.exists()
    assert not (tmp_path / ".fresh.tmp").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.png").write_bytes(b"previous good copy")
    with pytest.raises(DatasetError):
        copy_verified(fake, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.png"]
    assert (existing / "keep.png").read_bytes() == b"previous good copy"


# ---------------------------------------------------------------- lung split by patient


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return pd.read_csv(LUNG_SEG / "manifest.csv")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_lung_split_by_patient(manifest: pd.DataFrame, seed: int) -> None:
    table = lung_split(manifest, test_slices=100, val_slices=100, seed=seed)
    assert len(table) == len(manifest) == 1008
    assert list(table["id"]) == list(manifest["id"])
    assert set(table["split"]) == {"train", "val", "test"}
    splits_per_patient = table.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()
    counts = table["split"].value_counts()
    assert abs(counts["test"] - 100) <= 15
    assert abs(counts["val"] - 100) <= 15
    assert counts["train"] == 1008 - counts["test"] - counts["val"]
    assert (table["image"] == "images/" + table["id"] + ".png").all()
    assert (table["mask"] == "masks/" + table["id"] + ".png").all()
    assert (LUNG_SEG / table["image"].iloc[0]).is_file() and (LUNG_SEG / table["mask"].iloc[0]).is_file()


def test_lung_split_deterministic(manifest: pd.DataFrame) -> None:
    a = lung_split(manifest, 100, 100, seed=3)
    b = lung_split(manifest, 100, 100, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_lung_split_subset_per_patient(manifest: pd.DataFrame) -> None:
    full = lung_split(manifest, 100, 100, seed=0)
    small = lung_split(manifest, 100, 100, seed=0, subset_per_patient=2)
    assert (small.groupby("patient_id").size() == 2).all()
    assert len(small) == 2 * manifest["patient_id"].nunique()
    split_of = dict(zip(full["patient_id"], full["split"], strict=False))
    assert all(split_of[p] == s for p, s in zip(small["patient_id"], small["split"], strict=True))


def _manifest(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [{"id": f"{p}_{i:03d}", "patient_id": p} for p, n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_lung_split_small_synthetic_exact() -> None:
    # sizes 10, 20, 30, 40: test target 30 -> {c} or {a, b} (both exact), val from the rest
    table = lung_split(_manifest({"a": 10, "b": 20, "c": 30, "d": 40}), test_slices=30, val_slices=40, seed=0)
    counts = table["split"].value_counts().to_dict()
    assert counts["test"] == 30
    assert counts["val"] == 40
    assert counts["train"] == 30
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()


@pytest.mark.parametrize("n_patients", [1, 2])
def test_lung_split_needs_three_patients(n_patients: int) -> None:
    manifest = _manifest({f"p{i}": 20 for i in range(n_patients)})
    with pytest.raises(DatasetError, match="3 patients"):
        lung_split(manifest, 10, 10, seed=0)


def test_lung_split_missing_column() -> None:
    with pytest.raises(DatasetError, match="patient_id"):
        lung_split(pd.DataFrame({"id": ["a", "b"]}), 10, 10, seed=0)


def test_lung_split_three_patients_where_two_fit_test_target() -> None:
    # 3 patients of 50 slices, targets 100/100: the best test set is 2 patients (exactly 100),
    # which leaves a single patient for val and train together.
    table = lung_split(_manifest({"a": 50, "b": 50, "c": 50}), test_slices=100, val_slices=100, seed=0)
    assert set(table["split"]) == {"train", "val", "test"}
