"""The device check: the paper profile's stages end to end on a GPU, then every EfficientNet
B0-B7 trained one epoch at its native resolution, timed, into ``--out`` (``reports/gpu/``).

On a lent GPU machine, from the repository root, after ``python scripts/gpu_bundle.py`` here
built ``.gpu/`` (wheels, a compact copy of the prepared data, params):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
    PYTHONPATH=/tmp/site:src python3 scripts/gpu_check.py --root .gpu/root --out reports/gpu

On the CPU here, the same code path on the tiny budget (minutes) before any device is used:

    python scripts/gpu_check.py --root .gpu/root --out /tmp/gpu-dry-run --dry-run

It runs the stage modules DVC runs (every stage of dvc.yaml after the audit: train_segmenter, train_lesion, crop_images,
train_classifier cropped and raw, evaluate, evaluate_sources, register_model) in one process without DVC; MLflow
logs to a SQLite store under ``--root``. The classifier starts from random weights (no hub on
the device), so its metrics are not the paper's; proving the path and measuring speed are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Run before the check, on the machine that builds the bundle (the check starts from their outputs).
PREPARED = ("prepare_data", "audit_data")


def pipeline_stages(repo: Path) -> list[str]:
    """dvc.yaml's stages in its order, ``foreach`` ones as ``name@key``, minus the prepared ones."""
    import yaml

    stages = []
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        stages += [f"{name}@{key}" for key in stage["foreach"]] if "foreach" in stage else [name]
    return [s for s in stages if s not in PREPARED]


NETWORKS = tuple(f"efficientnet_b{i}" for i in range(8))
#: Dry run on the CPU: the same stages and networks, a budget of minutes.
DRY_RUN = {
    "segmenter": {"channels": [4, 8, 16, 32], "epochs": 1, "batch_size": 8},
    "lesion": {"channels": [4, 8, 16, 32], "epochs": 1, "batch_size": 8},  # starts from the segmenter: same widths
    "classifier": {"model": "efficientnet_b0", "pretrained": "none", "image_size": 64, "epochs": 1, "batch_size": 8},
}


def stage_runner(name: str) -> Callable[[dict[str, Any], Path], None]:
    import importlib

    module, _, variant = name.partition("@")
    run = importlib.import_module(f"covidct.stages.{module}").run
    return (lambda params, root: run(params, root, variant)) if variant else run


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, {"seconds": time.perf_counter() - started, "peak_gib": peak_memory_gib(device)}


def network_sweep(
    root: Path, params: dict[str, Any], device: torch.device, networks: tuple[str, ...], dry_run: bool
) -> dict[str, dict[str, Any]]:
    """Each network one epoch on the cropped images at its native resolution (the dry run: 64 px),
    through the classifier stage's own training function."""

    import timm

    from covidct.classification.table import checkpoint_meta, classifier_table, load_classifier_inputs
    from covidct.classification.train import fit_and_predict
    from covidct.config import ClassifierConfig, declared_sources

    results = {}
    for name in networks:
        size = 64 if dry_run else int(timm.get_pretrained_cfg(name).input_size[-1])
        config = ClassifierConfig.of(params).replace(model=name, image_size=size, epochs=1)
        table = classifier_table(root, config, declared_sources(params))
        images = load_classifier_inputs(root, table, "cropped", config, progress=None)
        out = root / "sweep" / name
        (history, _, _), timing = timed(
            device,
            lambda c=config, t=table, i=images, o=out: fit_and_predict(
                i, t, c, device, o / "model.safetensors", checkpoint_meta(c, "cropped")
            ),
        )
        row = history.iloc[-1]
        results[name] = {
            "image_size": size,
            "batch_size": config.batch_size,
            "train_images_per_s": float(row["train_images_per_s"]),
            "epoch_seconds": float(row["epoch_seconds"]),
            "val_auc_after_one_epoch": float(row["val_auc"]),
            **timing,
        }
        print(f"{name} @ {size}: {results[name]['train_images_per_s']:.0f} images/s, peak {timing['peak_gib']} GiB")
    return results


def headline(root: Path) -> dict[str, Any]:
    """What the stages measured, read from the files they wrote."""
    metrics = json.loads((root / "reports/metrics.json").read_text())
    dice = json.loads((root / "reports/segmenter/metrics.json").read_text())
    return {
        "segmenter_dice_mean": dice["dice_mean"],
        "covid_ct_test_auc_cropped": metrics["cropped"]["test"]["auc"],
        "covid_ct_test_auc_raw": metrics["raw"]["test"]["auc"],
        "note": "classifier from random weights (no hub on the device): not the paper's figures",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".gpu/root"), help="the prepared root gpu_bundle.py made")
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--dry-run", action="store_true", help="tiny budget on whatever device is here")
    args = parser.parse_args()
    root = args.root.resolve()
    os.environ.update({"DVC_ROOT": str(root), "NO_ALBUMENTATIONS_UPDATE": "1", "COVIDCT_PIPELINE_RUN": "gpu-check"})
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    (root / "mlruns").mkdir(exist_ok=True)

    from covidct.atomic import write_text_atomic
    from covidct.config import load_params
    from covidct.experiments.overrides import with_overrides
    from covidct.runtime import configure_threads, select_device

    params = load_params(root / "params.yaml")
    if args.dry_run:
        params = with_overrides(params, {f"{s}.{k}": v for s, keys in DRY_RUN.items() for k, v in keys.items()})
    device, threads = select_device(), configure_threads()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": threads,
        "dry_run": args.dry_run,
        "segmenter": {k: params["segmenter"][k] for k in ("channels", "epochs", "batch_size", "precision")},
        "classifier": {
            k: params["classifier"][k] for k in ("model", "image_size", "epochs", "batch_size", "precision")
        },
        "stages": {},
    }
    started = time.perf_counter()
    for stage in pipeline_stages(Path(__file__).resolve().parents[1]):
        print(f"== {stage}", flush=True)
        _, report["stages"][stage] = timed(device, lambda s=stage: stage_runner(s)(params, root))
        write_text_atomic(
            args.out / "check.json", json.dumps(report, indent=2) + "\n"
        )  # what ran so far survives a timeout
    report["pipeline_seconds"] = time.perf_counter() - started
    report["results"] = headline(root)
    networks = NETWORKS[:2] if args.dry_run else NETWORKS
    report["networks"] = network_sweep(root, params, device, networks, args.dry_run)
    report["total_seconds"] = time.perf_counter() - started
    write_text_atomic(args.out / "check.json", json.dumps(report, indent=2) + "\n")
    loaded = {name.split(".")[0] for name, module in list(sys.modules.items()) if module is not None}  # None: blocked
    modules = sorted(loaded - set(sys.stdlib_module_names) - {"__main__"})
    write_text_atomic(args.out / "modules.json", json.dumps(modules) + "\n")  # what gpu_bundle.py carries wheels for
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
