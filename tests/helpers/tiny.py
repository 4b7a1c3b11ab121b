"""Tiny stand-ins built from real code: untrained networks saved as the stages save theirs, and a
root prepared as `dvc repro prepare_data` leaves it on the tiny profile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

from helpers.paths import DATA, REPO


def save_tiny_networks(root: Path) -> tuple[Path, Path]:
    """A small seeded, untrained segmenter and B0 classifier saved as the training stages save
    theirs, for tests of what runs the networks (the registered pipeline, predict, serving)."""
    import torch

    from covidct.checkpoints import save_state_dict
    from covidct.classification.model import build_classifier, normalisation
    from covidct.segmentation.model import build_segmenter

    torch.manual_seed(0)
    save_state_dict(
        root / "segmenter.safetensors",
        build_segmenter([4, 8, 16]).state_dict(),
        {"channels": [4, 8, 16], "size": 64, "clahe_clip": 7.0, "epoch": 1},
    )
    classifier = build_classifier("efficientnet_b0")
    mean, std = normalisation(classifier)
    meta = {
        "model": "efficientnet_b0",
        "image_size": 64,
        "variant": "cropped",
        "epoch": 1,
        "mean": list(mean),
        "std": list(std),
    }
    save_state_dict(root / "classifier.safetensors", classifier.state_dict(), meta)
    return root / "segmenter.safetensors", root / "classifier.safetensors"


def save_tiny_lesion(root: Path) -> Path:
    """A small seeded, untrained lesion segmenter saved as the train_lesion stage saves its own:
    it marks blobs at random, which is all a test of the burden's plumbing needs."""
    import torch

    from covidct.checkpoints import save_state_dict
    from covidct.segmentation.model import build_segmenter

    torch.manual_seed(1)
    meta = {"channels": [4, 8, 16], "size": 64, "clahe_clip": 7.0, "epoch": 1}
    save_state_dict(root / "lesion.safetensors", build_segmenter([4, 8, 16]).state_dict(), meta)
    return root / "lesion.safetensors"


def prepare_tiny_root(root: Path) -> Path:
    """``root`` as `dvc repro prepare_data` leaves it on the tiny profile: params, profiles, data and splits."""
    from covidct.config import load_params
    from covidct.profiles import apply_profile, set_params
    from covidct.stages import prepare_data

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "pipelines" / "profiles", root / "pipelines" / "profiles")
    apply_profile(root, "tiny")
    set_params(root, {"data.source_dir": str(DATA)})
    prepare_data.run(load_params(root / "params.yaml"), root)
    return root


def run_ok(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow, DVC or covidct setting of the caller's, on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))}
    return env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "COVIDCT_DEVICE": "cpu",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **extra,
    }


#: A fourth source, declared in params.yaml like the real three: what a new hospital's data takes.
TOY = "toy-hospital"
TOY_DECLARATION = {
    "title": "Toy hospital",
    "split": "manifest",
    "classes": "diagnosis",
    "covid": ["covid-19"],
    "patient": "patient_id",
    "scan": "patient_id",
    "thin": False,
}


def write_toy_source(folder: Path, per_cell: int = 3) -> Path:
    """A labelled source the tests make: CT-like slices (a bright body, two dark lungs, COVID ones
    with brighter patches in the lungs), ``per_cell`` patients per class and split, a manifest with
    the split, and the SHA256SUMS prepare_data verifies."""
    import hashlib

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(7)
    (folder / "slices").mkdir(parents=True)
    rows = []
    yy, xx = np.mgrid[:96, :96]
    for split in ("train", "val", "test"):
        for diagnosis in ("covid-19", "healthy"):
            for k in range(per_cell):
                patient = f"{split[:2]}-{diagnosis[:1]}{k}"
                # each patient its own body and lungs (no two slices alike, as the audit requires), textured
                ay, ax, cy = rng.uniform(30, 46), rng.uniform(30, 46), rng.uniform(40, 56)
                image = np.where(((yy - cy) / ay) ** 2 + ((xx - 48) / ax) ** 2 < 1, 170, 10).astype(float)
                for side in (-1, 1):
                    lx, ly = 48 + side * rng.uniform(12, 20), cy + rng.uniform(-6, 6)
                    image[((yy - ly) / rng.uniform(14, 28)) ** 2 + ((xx - lx) / rng.uniform(7, 13)) ** 2 < 1] = 40
                if diagnosis == "covid-19":
                    py, px = cy + rng.uniform(-10, 10), 48 + rng.choice([-1, 1]) * rng.uniform(12, 18)
                    image[(yy - py) ** 2 + (xx - px) ** 2 < rng.uniform(20, 60)] = 110
                image += rng.normal(0, 8, image.shape) + 25 * np.sin(xx / rng.uniform(3, 9) + rng.uniform(0, 6))
                name = f"slices/{patient}.png"
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name)
                rows.append({"file": name, "diagnosis": diagnosis, "split": split, "patient_id": patient})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    names = [r["file"] for r in rows] + ["manifest.csv"]
    sums = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return folder


def data_with_toy_source(to: Path) -> Path:
    """The real datasets (hard links where the file system allows, else copies) and the toy source, in one folder."""
    for dataset in DATA.iterdir():
        if dataset.is_dir():
            try:
                shutil.copytree(dataset, to / dataset.name, copy_function=os.link)
            except OSError:
                shutil.rmtree(to / dataset.name, ignore_errors=True)
                shutil.copytree(dataset, to / dataset.name)
    write_toy_source(to / TOY)
    return to


def make_tiny_repo(repo: Path, env: dict[str, str], data: Path = DATA) -> Path:
    """A git + DVC repository at ``repo`` with this checkout's files (no outputs) on the tiny
    profile, reading the datasets in ``data``, committed and ready for `dvc repro`; a toy source
    there (:data:`TOY`) is declared beside the real ones and held out."""
    from covidct.profiles import apply_profile, set_params

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        inputs = name == "reports/levers/holdout.json" or name.startswith("reports/sweeps/confirmations/")
        outputs = name.startswith(("dvc.lock", "reports/", "models/")) and not inputs
        if (REPO / name).is_file() and not outputs:  # the studies' reports are inputs of register_model
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    apply_profile(repo, "tiny")
    set_params(repo, {"data.source_dir": str(data)})
    if (data / TOY).is_dir():  # declared by hand, as a user adds a source: one more entry under sources:
        params = YAML()
        tree = params.load(repo / "params.yaml")
        tree["sources"][TOY] = TOY_DECLARATION
        params.dump(tree, repo / "params.yaml")
    run_ok(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc").is_dir():
        run_ok(["dvc", "init", "-q"], repo, env)
    run_ok(["dvc", "config", "core.analytics", "false"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "tiny"], repo, env)
    return repo


@dataclass(frozen=True)
class TrackedRepro:
    """The tiny ``dvc repro`` as a team runs it (see ``tracked_tiny_repro``)."""

    repo: Path
    env: dict[str, str]
    remote: Path
    server: str
    output: str  # what `dvc repro` printed


def tracked_tiny_repro(base: Path, server: str) -> TrackedRepro:
    """A tiny repository under ``base`` whose `dvc repro` logged every stage through the MLflow
    ``server``, then `dvc push` to a directory remote and committed: what a teammate clones."""
    env = clean_env(MLFLOW_TRACKING_URI=server)
    repo = make_tiny_repo(base / "first", env, data_with_toy_source(base / "data"))
    remote = base / "remote"
    run_ok(["dvc", "remote", "add", "-d", "team", str(remote)], repo, env)
    repro = run_ok(["dvc", "repro"], repo, env)
    run_ok(["dvc", "push"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "repro"], repo, env)
    return TrackedRepro(repo, env, remote, server, repro.stdout)


def git_clone(first: Path, to: Path, env: dict[str, str]) -> Path:
    """A fresh clone of ``first`` at ``to``: its git files only, no DVC outputs."""
    run_ok(["git", "clone", "-q", "--no-hardlinks", str(first), str(to)], to.parent, env)
    return to


def pulled_clone(first: Path, to: Path, env: dict[str, str]) -> Path:
    """A fresh clone of ``first`` at ``to`` with its DVC outputs pulled from the remote: no training."""
    run_ok(["dvc", "pull"], git_clone(first, to, env), env)
    return to
