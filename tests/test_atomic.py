"""Atomic writes: all or nothing, and the file is as readable as a plain write would leave it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from covidct.atomic import atomic_dir, atomic_path, write_text_atomic


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=oct)
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_file_has_the_mode_a_plain_write_gets(tmp_path: Path, umask: int) -> None:
    write_text_atomic(tmp_path / "atomic.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    mode = (tmp_path / "atomic.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_written_directory_has_the_mode_a_plain_mkdir_gets(tmp_path: Path, umask: int) -> None:
    with atomic_dir(tmp_path / "crops") as fresh:
        fresh.mkdir()
        (fresh / "a.png").write_bytes(b"x")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "crops").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops", "plain"]  # no staging left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crashed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_directory_keeps_the_old_one(tmp_path: Path) -> None:
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "old.png").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "crops") as fresh:
        fresh.mkdir()
        (fresh / "new.png").write_bytes(b"new")
        raise RuntimeError("crashed mid-crop")
    assert [p.name for p in (tmp_path / "crops").iterdir()] == ["old.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["crops"]
