"""Device, precision, threads and seeds: one place, so CPU and GPU users run the same code."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

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
