"""Device, precision, threads and seeds: one place, so CPU and GPU users run the same code."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def select_device() -> torch.device:
    """CUDA when present (``COVIDCT_DEVICE`` overrides, e.g. ``cpu``)."""
    wanted = os.environ.get("COVIDCT_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads() -> int:
    """Use every core for intra-op work; the data pipeline runs in the main process."""
    threads = int(os.environ.get("COVIDCT_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision on CUDA (bf16 where supported), full fp32 on CPU where it would be slower."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling only matters for fp16; a disabled scaler is a no-op elsewhere."""
    enabled = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


def _augmentation_nodes(pipeline: object) -> list[object]:
    """The pipeline and every transform in it that owns random generators, in a fixed order.

    albumentations gives each transform its own numpy and python generators (seeded from
    the Compose seed), so saving only the Compose's would replay different augmentations.
    """
    nodes = [pipeline] if hasattr(pipeline, "random_generator") and hasattr(pipeline, "py_random") else []
    for child in getattr(pipeline, "transforms", None) or []:
        nodes.extend(_augmentation_nodes(child))
    return nodes


def rng_state(device: torch.device, loader_generator: torch.Generator | None = None, augmentation: object | None = None) -> dict[str, Any]:
    """Every random stream a training epoch draws from, as plain types and tensors, so it can be
    saved and read back with ``torch.load(weights_only=True)``: python, numpy (global), torch
    (CPU, and CUDA on a GPU), the data loader's shuffling generator and the augmentation pipeline."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
        "augmentation": [
            {"numpy": node.random_generator.bit_generator.state, "python": node.py_random.getstate()} for node in _augmentation_nodes(augmentation)
        ],
    }


def restore_rng_state(state: dict[str, Any], device: torch.device, loader_generator: torch.Generator | None = None, augmentation: object | None = None) -> None:
    """Put back what :func:`rng_state` captured, so the next epoch draws exactly what it would have."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])
    nodes = _augmentation_nodes(augmentation)
    if len(nodes) != len(state["augmentation"]):
        raise ValueError(f"augmentation pipeline has {len(nodes)} random transforms, the saved state {len(state['augmentation'])}")
    for node, saved in zip(nodes, state["augmentation"], strict=True):
        node.random_generator.bit_generator.state = saved["numpy"]
        node.py_random.setstate(_as_tuples(saved["python"]))


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants nested tuples; a round trip through a file may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
