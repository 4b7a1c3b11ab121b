"""Builds ``.gpu/`` for the device check (``scripts/gpu_check.py``) and dry-runs the check on the
CPU here, in one command, so a session lent a GPU only has to carry ``.gpu`` and run it:

    python scripts/gpu_bundle.py          # after `dvc repro prepare_data`; a few minutes

A device call carries at most 64 MiB, and ``../shared`` does not travel, so ``.gpu/`` holds:
- ``root/``: a prepared repository root, as `dvc repro prepare_data` leaves one, compacted:
  COVID-CT whole (746 images, longest side at most 320 px, the paper profile's input size), a
  third of the lung set (every third slice of each of its 18 patients; masks PNG as they are),
  CC-CCII a few scans per split and class; images JPEG at quality 75 under their own names
  (the readers decode by content), the splits as prepare_data wrote them (cut to what travels),
  and ``params.yaml`` on the paper profile with the budget of ``CHECK_BUDGET`` and random
  starting weights (no hub there). It proves the path and measures speed; its metrics are not
  the full data's;
- ``wheels/``: every package the dry run imported that the device image lacks
  (``DEVICE_PACKAGES`` and what they require, from the device's package list) and that is not
  ``LEFT_BEHIND``, at the versions installed here, built for its Python 3.12.
The dry run (``gpu_check.py --dry-run`` on a copy of ``root/``, with the left-behind modules
blocked) records which modules the check imports, which is how the wheel list is made and checked.
The build fails, naming the sizes, when ``.gpu`` and the checkout exceed what a call carries.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from packaging.requirements import Requirement

from covidct.catalog import split_path
from covidct.images import read_grayscale
from covidct.paths import CC_CCII_SPLIT, COVID_CT_SPLIT, LUNG_SPLIT, raw
from covidct.profiles import apply_profile, set_params

#: What the paper profile runs for in the check: estimated at ~7 minutes of an H200 (not yet measured).
CHECK_BUDGET = {"segmenter.epochs": 30, "classifier.epochs": 20, "classifier.pretrained": "none"}
COVID_CT_SIDE, JPEG_QUALITY, LUNG_STRIDE = 320, 75, 3
CARRY_LIMIT_MIB = 64  # what one device call carries: the checkout and .gpu together
CC_CCII_SCANS, CC_CCII_SLICES = 4, 8  # per split and class; evenly spaced slices per scan
SARS_SPLIT, SARS_STRIDE = split_path("sars-cov-2-ct"), 3  # every third slice of each scan, as JPEG
#: Distributions the device image already has (the device tool's package list, read 2026-11-17);
#: timm is left out of it on purpose, so it travels: the code needs the API of the version pinned here.
DEVICE_PACKAGES = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
    charset-normalizer click cloudpickle contourpy cycler filelock fonttools frozenlist fsspec h11 h5py
    hf-xet httpcore httpx huggingface-hub idna imageio jinja2 joblib kiwisolver lazy-loader markdown
    markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx numpy
    opencv-python-headless packaging pandas pillow pip platformdirs protobuf psutil pyarrow pygments
    pyparsing python-dateutil pytz pyyaml regex requests rich safetensors scikit-image scikit-learn
    scipy setuptools six sympy threadpoolctl tifffile tokenizers torch torchvision tqdm
    typing-extensions tzdata urllib3 werkzeug wheel yarl zipp""".split()
)
#: Imported here only because they are installed, so not carried: pydicom's decoder plugins (monai
#: and pydicom probe for them; the check reads PNG and JPEG), and the mlflow and mlflow-tracing
#: wheels, whose Python files mlflow-skinny holds too (mlflow adds the tracking server's web UI).
LEFT_BEHIND = {
    "python-gdcm",
    "pyjpegls",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "mlflow",
    "mlflow-tracing",
}
#: Files only the full mlflow wheel has that a module could import: blocked in the dry run too.
FULL_MLFLOW_ONLY = ["mlflow.utils.model_catalog"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(24, 40))]


def _jpeg(path: Path, gray: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def build_root(repo: Path, out: Path) -> None:
    covid = pd.read_csv(repo / COVID_CT_SPLIT)
    for relpath in covid["relpath"]:
        gray = read_grayscale(repo / raw("covid-ct") / relpath)
        scale = COVID_CT_SIDE / max(gray.shape)
        if scale < 1:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        _jpeg(out / raw("covid-ct") / relpath, gray)
    shutil.copytree(repo / raw("covid-ct") / "meta", out / raw("covid-ct") / "meta")
    lung = pd.read_csv(repo / LUNG_SPLIT)
    lung = lung[lung.groupby("patient_id").cumcount() % LUNG_STRIDE == 0]
    for row in lung.itertuples():
        _jpeg(out / raw("lung-seg") / row.image, read_grayscale(repo / raw("lung-seg") / row.image))
        _copy(repo / raw("lung-seg") / row.mask, out / raw("lung-seg") / row.mask)
    cc = pd.read_csv(repo / CC_CCII_SPLIT)
    scans = cc.drop_duplicates("scan").sort_values("scan").groupby(["split", "subclass"]).head(CC_CCII_SCANS)
    kept = []
    for _, scan in cc[cc["scan"].isin(scans["scan"])].sort_values(["scan", "relpath"]).groupby("scan"):
        kept.append(scan.iloc[np.unique(np.linspace(0, len(scan) - 1, min(CC_CCII_SLICES, len(scan))).astype(int))])
    cc = pd.concat(kept)
    for relpath in cc["relpath"]:
        _copy(repo / raw("cc-ccii") / relpath, out / raw("cc-ccii") / relpath)
    sars = pd.read_csv(repo / SARS_SPLIT)
    sars = sars[sars.groupby("scan").cumcount() % SARS_STRIDE == 0]
    for relpath in sars["relpath"]:
        _jpeg(out / raw("sars-cov-2-ct") / relpath, read_grayscale(repo / raw("sars-cov-2-ct") / relpath))
    (out / CC_CCII_SPLIT).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / COVID_CT_SPLIT, out / COVID_CT_SPLIT)
    lung.to_csv(out / LUNG_SPLIT, index=False)
    cc.to_csv(out / CC_CCII_SPLIT, index=False)
    sars.to_csv(out / SARS_SPLIT, index=False)
    shutil.copy2(repo / "params.yaml", out / "params.yaml")
    shutil.copytree(repo / "pipelines" / "profiles", out / "pipelines" / "profiles")
    apply_profile(out, "paper")
    set_params(out, CHECK_BUDGET)
    shutil.rmtree(out / "pipelines")


def blocked_modules() -> list[str]:
    """The modules only ``LEFT_BEHIND`` distributions provide (and ``FULL_MLFLOW_ONLY``)."""
    owners = importlib.metadata.packages_distributions()
    only_left_behind = [m for m, dists in owners.items() if {_normalized(d) for d in dists} <= LEFT_BEHIND]
    return sorted(only_left_behind) + FULL_MLFLOW_ONLY


def dry_run_command(repo: Path, root: Path, out: Path) -> list[str]:
    """The check's dry run on this CPU as the device would run it: what is not carried cannot be
    imported (a None in ``sys.modules`` makes its import fail)."""
    block = "import runpy, sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); del sys.argv[:2]; "
    block += "runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", block, ",".join(blocked_modules()), str(repo / "scripts/gpu_check.py")]
    return [*command, "--root", str(root), "--out", str(out), "--dry-run"]


def dry_run(repo: Path, root: Path) -> tuple[dict, list[str]]:
    """The dry run on a copy of ``root``; its report and the modules it imported."""
    with tempfile.TemporaryDirectory(prefix="covidct-gpu-dry-") as tmp:
        copy, out = Path(tmp) / "root", Path(tmp) / "out"
        shutil.copytree(root, copy)
        subprocess.run(dry_run_command(repo, copy, out), check=True)
        return json.loads((out / "check.json").read_text()), json.loads((out / "modules.json").read_text())


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_distributions() -> set[str]:
    """``DEVICE_PACKAGES`` and what they require (with extras), as installed here: the device's
    torch brings its own CUDA libraries (nvidia-*, triton), which are gigabytes, not wheels to carry."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, frozenset()) for name in DEVICE_PACKAGES]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requirements):
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((_normalized(requirement.name), frozenset(requirement.extras)))
    return {name for name, _ in seen}


def needed_distributions(modules: list[str]) -> dict[str, str]:
    """Distribution -> version installed here, for each imported module the device lacks."""
    owners = importlib.metadata.packages_distributions()
    on_device = device_distributions()
    needed = {}
    for module in modules:
        for dist in owners.get(module, []):
            name = _normalized(dist)
            if name not in on_device | LEFT_BEHIND and name != "covidct":
                needed[name] = importlib.metadata.version(dist)
    return dict(sorted(needed.items()))


def download_wheels(needed: dict[str, str], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms]
    subprocess.run([*command, *(f"{name}=={version}" for name, version in needed.items())], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    repo = Path.cwd()
    root = args.out / "root"
    shutil.rmtree(root, ignore_errors=True)
    build_root(repo, root)
    report, modules = dry_run(repo, root)
    needed = needed_distributions(modules)
    download_wheels(needed, args.out / "wheels")
    sizes = {p.name: _mib(p.rglob("*")) for p in (root, args.out / "wheels")}
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, check=True
    )
    sizes["checkout"] = _mib(Path(name) for name in listed.stdout.splitlines())
    print(f"dry run on {report['device']}: {report['total_seconds']:.0f} s; stages {', '.join(report['stages'])}")
    print(f"wheels ({len(needed)}): {', '.join(f'{k}=={v}' for k, v in needed.items())}")
    summary = ", ".join(f"{k} {v:.1f}" for k, v in sizes.items())
    if sum(sizes.values()) > CARRY_LIMIT_MIB:
        sys.exit(f"MiB: {summary}: over the {CARRY_LIMIT_MIB} MiB a device call carries; cut {root} or the wheels")
    print(f"MiB: {summary}: {sum(sizes.values()):.1f} of the {CARRY_LIMIT_MIB} a device call carries")


def _mib(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


if __name__ == "__main__":
    main()
