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

from conftest import DATA, REPO


def save_tiny_networks(root: Path) -> tuple[Path, Path]:
    """A small seeded, untrained segmenter and B0 classifier saved as the training stages save
    theirs, for tests of what runs the networks (the registered pipeline, predict, serving)."""
    import torch

    from covidct.checkpoints import save_checkpoint
    from covidct.classification.model import build_classifier, normalisation
    from covidct.segmentation.model import build_segmenter

    torch.manual_seed(0)
    save_checkpoint(
        root / "segmenter.safetensors",
        build_segmenter([4, 8, 16]),
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
    save_checkpoint(root / "classifier.safetensors", classifier, meta)
    return root / "segmenter.safetensors", root / "classifier.safetensors"


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


def make_tiny_repo(repo: Path, env: dict[str, str]) -> Path:
    """A git + DVC repository at ``repo`` with this checkout's files (no outputs) on the tiny
    profile, reading the real data, committed and ready for `dvc repro`."""
    from covidct.profiles import apply_profile, set_params

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("dvc.lock", "reports/", "models/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    apply_profile(repo, "tiny")
    set_params(repo, {"data.source_dir": str(DATA)})
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
    repo = make_tiny_repo(base / "first", env)
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
