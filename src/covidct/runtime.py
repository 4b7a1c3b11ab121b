"""Device, precision, threads and seeds: one place, so CPU and GPU users run the same code."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from covidct.config import PRECISIONS


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


def native_cpu_bf16() -> bool:
    """bf16 in the CPU's hardware (AVX512-BF16 or AMX): only there does bf16 autocast pay off on
    a CPU; elsewhere it is emulated and slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, precision: str, cpu_auto_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None is plain fp32.

    ``auto``: bf16 on a CUDA GPU that has it (fp16 with loss scaling otherwise); on a CPU, bf16
    only for a network measured to gain from it (``cpu_auto_bf16``: the AttentionUnet, 1.5x in
    training and 2x in inference on an AMX CPU; EfficientNet gained nothing) and only where the
    CPU does bf16 in hardware.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ValueError(f"precision fp16 needs a CUDA device, not {device.type} (use auto, fp32 or bf16)")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_auto_bf16 and native_cpu_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None | str = "auto") -> Iterator[None]:
    """Mixed precision in ``dtype`` (see :func:`autocast_dtype`; "auto": its auto for this device)."""
    if dtype == "auto":
        dtype = autocast_dtype(device, "auto")
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def grad_scaler(device: torch.device, dtype: torch.dtype | None | str = "auto") -> torch.amp.GradScaler:
    """Loss scaling only matters for fp16; a disabled scaler is a no-op elsewhere."""
    if dtype == "auto":
        dtype = autocast_dtype(device, "auto")
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)


def _augmentation_nodes(pipeline: object) -> list[object]:
    """The pipeline and every transform in it that owns random generators, in a fixed order.

    albumentations gives each transform its own numpy and python generators (seeded from
    the Compose seed), so saving only the Compose's would replay different augmentations.
    """
    nodes = [pipeline] if hasattr(pipeline, "random_generator") and hasattr(pipeline, "py_random") else []
    for child in getattr(pipeline, "transforms", None) or []:
        nodes.extend(_augmentation_nodes(child))
    return nodes


def rng_state(
    device: torch.device, loader_generator: torch.Generator | None = None, augmentation: object | None = None
) -> dict[str, Any]:
    """Every random stream a training epoch draws from, as plain types and tensors, so it can be
    saved and read back with ``torch.load(weights_only=True)``: python, numpy (global), torch
    (CPU, and CUDA on a GPU), the data loader's shuffling generator and the augmentation pipeline."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
        "augmentation": [
            {"numpy": node.random_generator.bit_generator.state, "python": node.py_random.getstate()}
            for node in _augmentation_nodes(augmentation)
        ],
    }


def restore_rng_state(
    state: dict[str, Any],
    device: torch.device,
    loader_generator: torch.Generator | None = None,
    augmentation: object | None = None,
) -> None:
    """Put back what :func:`rng_state` captured, so the next epoch draws exactly what it would have."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])
    nodes = _augmentation_nodes(augmentation)
    if len(nodes) != len(state["augmentation"]):
        raise ValueError(
            f"augmentation pipeline has {len(nodes)} random transforms, the saved state {len(state['augmentation'])}"
        )
    for node, saved in zip(nodes, state["augmentation"], strict=True):
        node.random_generator.bit_generator.state = saved["numpy"]
        node.py_random.setstate(_as_tuples(saved["python"]))


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants nested tuples; a round trip through a file may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
