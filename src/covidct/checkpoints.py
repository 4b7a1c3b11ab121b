"""Weights on disk: safetensors, with the metadata as one JSON string in its header. The format
holds tensors and strings only, so opening a checkpoint can never run code, and the same weights
always give the same bytes (``torch.save`` writes a random id into every file), so a
reproduction that matches leaves ``dvc.lock`` unchanged.

The per-epoch resume state of a training run lives here too, outside the DVC outputs
(``.covidct/resume/<stage>/``, git- and dvc-ignored): DVC deletes a stage's outputs before it
re-runs the stage, and a state that must survive that cannot be one of them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from covidct.atomic import atomic_path

RESUME_ROOT = Path(".covidct/resume")
RESUME_FILE = "state.pt"
META_KEY = "covidct"  # the one header entry: safetensors keeps the others in an unordered map


def _json_plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"checkpoint metadata holds a {type(value).__name__}, which JSON cannot hold")


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True, default=_json_plain)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_checkpoint(path: Path, device: torch.device, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``what`` names the producing stage for the error message (e.g. "train_segmenter")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (run the {what} stage)")
    try:
        with safe_open(str(path), framework="pt") as weights:
            header = weights.metadata() or {}
            state = {name: weights.get_tensor(name).to(device) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({exc}); run the {what} stage again") from exc
    if META_KEY not in header:
        raise ValueError(f"{path}: a safetensors file without covidct metadata; run the {what} stage again")
    return state, json.loads(header[META_KEY])


def resume_dir(root: Path, stage: str) -> Path:
    """Where a stage keeps its resume state between a kill and the next run."""
    return root / RESUME_ROOT / stage


def save_resume_state(directory: Path, state: dict[str, Any]) -> None:
    """Written through a temporary file and a rename: a kill during the save leaves the previous state."""
    with atomic_path(directory / RESUME_FILE) as tmp:
        torch.save(state, tmp)


def load_resume_state(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it belongs to this very run (same ``fingerprint``), else None.

    A state from other params, inputs or code is removed, never picked up; an unreadable one
    (which the atomic save should rule out) is treated the same way rather than stopping training.
    """
    path = directory / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file means: start afresh
        tqdm.write(f"{path}: unreadable resume state ({type(exc).__name__}: {exc}); starting afresh")
        clear_resume_state(directory)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        tqdm.write(f"{path}: resume state of another run (different params, inputs or code); starting afresh")
        clear_resume_state(directory)
        return None
    return state


def clear_resume_state(directory: Path) -> None:
    """Remove a run's resume state, with any temporary file a kill during a save left behind."""
    shutil.rmtree(directory, ignore_errors=True)


def clear_stage_resume(root: Path, stage: str) -> None:
    """After a stage succeeded: its resume state, then ``.covidct/resume`` and ``.covidct`` if now empty."""
    clear_resume_state(resume_dir(root, stage))
    for folder in (root / RESUME_ROOT, root / RESUME_ROOT.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()
