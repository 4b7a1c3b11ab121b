"""Reuse of expensive work: a sweep trial's segmenter for the same (loss, preprocessing, budget)
parameters, its crops for the same (segmenter, margin) pair, a lever run for the same settings and pixels.

Entries are directories named by a hash of everything that determines their content, built
in a temporary directory and renamed into place, under a file lock so two workers on one
machine never build the same entry twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

CACHE = Path("optuna/cache")  # under the repo root; ignored by git, kept between sessions on one machine


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def get_or_build(cache_dir: Path, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool, float]:
    """The entry's directory, whether it was reused, and the seconds spent building it (0 if reused)."""
    entry = cache_dir / kind / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if entry.is_dir():
            return entry, True, 0.0
        tmp = entry.with_name(f".{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started = time.perf_counter()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(entry)
        return entry, False, time.perf_counter() - started
