"""Resuming a killed training run, on real images in real processes.

A training process (this file run as a script) is killed with SIGKILL once its first epoch's
resume state exists, then started again: it must carry on from the last finished epoch, not
redo it, and end with exactly the weights and metrics of an uninterrupted run. Also: the same
seed gives the same run, and a resume state from other settings is never picked up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidct.checkpoints import (
    RESUME_FILE,
    clear_stage_resume,
    load_checkpoint,
    load_resume_state,
    resume_dir,
    save_resume_state,
)
from covidct.classification.data import load_resized
from covidct.classification.train import train_classifier
from covidct.datasets import covid_ct_split
from covidct.images import read_grayscale, read_mask
from covidct.segmentation.inputs import segmenter_input
from covidct.segmentation.train import train_segmenter
from covidct.training_loop import TIMING_COLUMNS, run_fingerprint
from helpers.configs import make_config
from helpers.paths import DATA

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

CPU = torch.device("cpu")
SIZE = 64
KINDS = ("segmenter", "classifier")
SEG_CONFIG = make_config("segmenter", channels=(4, 8, 16), epochs=4, batch_size=4, lr=2e-3, augment=True, seed=0)
# With a moving average of the weights: the resume state must carry it too.
CLF_CONFIG = make_config(
    "classifier", model="efficientnet_b0", image_size=SIZE, epochs=3, batch_size=4, ema_decay=0.9, seed=0
)
TIMING = set(TIMING_COLUMNS)  # wall-clock figures, the only history columns allowed to differ


# ---------------------------------------------------------------- the training process


def lung_sample() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """16 training and 4 validation slices, one per patient and depth, from the real lung set."""
    import cv2

    lung = DATA / "lung-seg"
    manifest = pd.read_csv(lung / "manifest.csv")
    ids = [i for n in (8, 20) for i in manifest.groupby("patient_id", sort=True).nth(n)["id"]]
    assert len(ids) >= 20

    def load(chosen: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([segmenter_input(read_grayscale(lung / "images" / f"{i}.png"), SIZE, 7.0) for i in chosen])
        masks = [
            cv2.resize(
                read_mask(lung / "masks" / f"{i}.png").astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST
            )
            for i in chosen
        ]
        return images, np.stack(masks).astype(bool)

    return load(ids[:16]), load(ids[16:20])


def covid_sample() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """16 training (8 per class) and 8 validation (4 per class) real COVID-CT images."""
    table = covid_ct_split(DATA / "covid-ct", subset_per_class=8)
    parts = []
    for split, n in (("train", 8), ("val", 4)):
        rows = table[table["split"] == split].groupby("label").head(n)
        parts.append(
            (
                load_resized([DATA / "covid-ct" / p for p in rows["relpath"]], SIZE, progress=None),
                rows["label"].to_numpy().copy(),
            )
        )
    return parts[0], parts[1]


def train(kind: str, out: Path, resume: Path | None, on_epoch=lambda row: None) -> pd.DataFrame:
    """One tiny real training run; the best checkpoint goes to ``out/model.safetensors``."""
    if kind == "segmenter":
        meta = {"channels": list(SEG_CONFIG.channels), "size": SIZE, "clahe_clip": 7.0}
        return train_segmenter(*lung_sample(), SEG_CONFIG, CPU, out / "model.safetensors", meta, on_epoch, resume)
    return train_classifier(
        *covid_sample(),
        CLF_CONFIG,
        CPU,
        out / "model.safetensors",
        {"model": CLF_CONFIG.model, "image_size": SIZE},
        on_epoch,
        resume,
    )


def recorded_run(kind: str, out: Path, resume: Path | None, announce: bool = False) -> None:
    """One training run that leaves its history and final (last-epoch) weights in ``out``.
    ``announce``: print a line per epoch it really trains, slowed so a test can kill between two."""
    import covidct.classification.train as classifier_module
    import covidct.segmentation.train as segmenter_module

    module = segmenter_module if kind == "segmenter" else classifier_module
    built: list[torch.nn.Module] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("build_segmenter", "build_classifier"):
            if hasattr(module, name):
                build = getattr(module, name)
                patch.setattr(module, name, lambda *a, _build=build, **kw: built.append(_build(*a, **kw)) or built[-1])
        if announce:
            step = module.train_one_epoch

            def counted(*args, **kwargs):
                print("TRAINED an epoch", flush=True)
                time.sleep(0.25)  # tiny epochs take ~0.1 s: leave the test time to kill between two of them
                return step(*args, **kwargs)

            patch.setattr(module, "train_one_epoch", counted)
        history = train(kind, out, resume)
    (out / "history.json").write_text(json.dumps(history.to_dict("records")))  # repr floats: exact
    torch.save(built[0].state_dict(), out / "final.pt")


def main(kind: str, out: str, resume: str) -> None:
    """The process the tests start and kill."""
    torch.set_num_threads(1)  # as in the tests' own process: thread count changes float sums
    recorded_run(kind, Path(out), None if resume == "-" else Path(resume), announce=True)


# ---------------------------------------------------------------- helpers


def _start(kind: str, out: Path, resume: Path | None) -> subprocess.Popen[str]:
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "COVIDCT_DEVICE": "cpu", "PYTHONHASHSEED": "random"}
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, kind, str(out), str(resume) if resume else "-"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(process: subprocess.Popen[str], timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _trained(output: str) -> int:
    return output.count("TRAINED ")


def _metrics(history: pd.DataFrame | list[dict]) -> list[dict]:
    rows = history.to_dict("records") if isinstance(history, pd.DataFrame) else history
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        state_dict, meta = load_checkpoint(path, torch.device("cpu"), "test")
        return {"state_dict": state_dict, "meta": meta}
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in the training processes: one intra-op thread, so in-process runs compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=KINDS)
def killed_and_resumed(request, tmp_path_factory) -> dict:
    """A run killed after its first epoch and started again, in processes of their own, beside an
    uninterrupted run in this process."""
    kind, base = request.param, tmp_path_factory.mktemp(request.param)
    epochs = SEG_CONFIG.epochs if kind == "segmenter" else CLF_CONFIG.epochs
    killed = _start(kind, base / "killed", base / "resume")
    state = base / "resume" / RESUME_FILE
    deadline = time.monotonic() + 240
    while not state.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    first_output, _ = killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{first_output[-3000:]}"
    killed_at = _load(state)["epoch"]
    assert 1 <= killed_at < epochs
    resumed = _start(kind, base / "killed", base / "resume")
    (base / "reference").mkdir()
    recorded_run(kind, base / "reference", base / "reference-resume")  # while the resumed process runs
    resumed_output = _finish(resumed)
    return {
        "kind": kind,
        "epochs": epochs,
        "base": base,
        "killed_at": killed_at,
        "first_trained": _trained(first_output),
        "resumed_output": resumed_output,
    }


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_killed_run_resumes_from_last_finished_epoch(killed_and_resumed: dict) -> None:
    run = killed_and_resumed
    # the killed process finished epoch `killed_at` (and was at most one epoch further on)
    assert run["first_trained"] in (run["killed_at"], run["killed_at"] + 1)
    assert f"resuming after epoch {run['killed_at']}" in run["resumed_output"]
    # the restarted process trained only the epochs that were not finished
    assert _trained(run["resumed_output"]) == run["epochs"] - run["killed_at"]


@pytest.mark.slow
def test_resumed_run_ends_where_an_uninterrupted_one_does(killed_and_resumed: dict) -> None:
    base, epochs = killed_and_resumed["base"], killed_and_resumed["epochs"]
    resumed = json.loads((base / "killed" / "history.json").read_text())
    reference = json.loads((base / "reference" / "history.json").read_text())
    assert [row["epoch"] for row in resumed] == list(range(1, epochs + 1))
    assert _metrics(resumed) == _metrics(reference)  # bit-identical floats, not approximately equal
    _assert_same_weights(_load(base / "killed" / "final.pt"), _load(base / "reference" / "final.pt"))
    best, best_reference = _load(base / "killed" / "model.safetensors"), _load(base / "reference" / "model.safetensors")
    assert best["meta"] == best_reference["meta"]
    _assert_same_weights(best["state_dict"], best_reference["state_dict"])
    # the finished state is left for the caller (the stage removes it once its outputs exist)
    assert _load(base / "resume" / RESUME_FILE)["epoch"] == epochs


@pytest.mark.slow
def test_same_seed_same_run_and_saving_changes_nothing(killed_and_resumed: dict, tmp_path: Path) -> None:
    """A second run with the same seed, without a resume state, repeats the uninterrupted run
    (which saved one after every epoch) exactly: same metrics and same best weights."""
    kind, base = killed_and_resumed["kind"], killed_and_resumed["base"]
    history = train(kind, tmp_path, None)
    assert _metrics(history) == _metrics(json.loads((base / "reference" / "history.json").read_text()))
    reference = _load(base / "reference" / "model.safetensors")
    mine = _load(tmp_path / "model.safetensors")
    assert mine["meta"] == reference["meta"]
    _assert_same_weights(mine["state_dict"], reference["state_dict"])


@pytest.mark.slow
def test_finished_state_is_reused_and_restores_deleted_checkpoint(killed_and_resumed: dict, tmp_path: Path) -> None:
    """A run killed after training but before its stage wrote its outputs: started again, it
    trains nothing and rewrites the best checkpoint that DVC deleted."""
    kind, base = killed_and_resumed["kind"], killed_and_resumed["base"]
    shutil.copytree(base / "reference-resume", tmp_path / "resume")
    seen: list[int] = []
    history = train(kind, tmp_path, tmp_path / "resume", on_epoch=lambda row: seen.append(row["epoch"]))
    assert seen == list(range(1, killed_and_resumed["epochs"] + 1))  # the finished epochs, replayed to the callback
    assert history.to_dict("records") == json.loads((base / "reference" / "history.json").read_text())
    _assert_same_weights(
        _load(tmp_path / "model.safetensors")["state_dict"],
        _load(base / "reference" / "model.safetensors")["state_dict"],
    )


def test_state_of_other_settings_is_never_picked_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state saved for another learning rate is discarded: the run starts at epoch 1."""
    train_data, val_data = covid_sample()
    config = make_config("classifier", model="efficientnet_b0", image_size=SIZE, epochs=1, batch_size=4, seed=0)
    meta = {"model": config.model, "image_size": SIZE}
    fingerprint = run_fingerprint(
        {"trainer": "classifier", "config": {"lr": 1.0}, "meta": meta, "device": "cpu"}, (*train_data, *val_data), ()
    )
    save_resume_state(tmp_path / "resume", {"fingerprint": fingerprint, "epoch": 1})
    seen: list[int] = []
    train_classifier(
        train_data,
        val_data,
        config,
        CPU,
        tmp_path / "model.safetensors",
        meta,
        lambda row: seen.append(row["epoch"]),
        tmp_path / "resume",
    )
    assert seen == [1]
    assert "resume state of another run" in capsys.readouterr().out
    assert _load(tmp_path / "resume" / RESUME_FILE)["fingerprint"] != fingerprint


def test_fingerprint_changes_with_settings_inputs_and_code(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8), np.uint8)
    base = run_fingerprint({"lr": 1e-3}, (images,), ("covidct.training_loop",))
    assert base == run_fingerprint({"lr": 1e-3}, (images.copy(),), ("covidct.training_loop",))
    changed = images.copy()
    changed[1, 2, 3] = 1
    assert base != run_fingerprint({"lr": 2e-3}, (images,), ("covidct.training_loop",))
    assert base != run_fingerprint({"lr": 1e-3}, (changed,), ("covidct.training_loop",))
    assert base != run_fingerprint({"lr": 1e-3}, (images.astype(bool),), ("covidct.training_loop",))
    assert base != run_fingerprint({"lr": 1e-3}, (images,), ("covidct.training_loop", "covidct.runtime"))


def test_unreadable_state_is_discarded_and_cleared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = resume_dir(tmp_path, "train_segmenter")
    directory.mkdir(parents=True)
    (directory / RESUME_FILE).write_bytes(b"not a torch file")
    assert load_resume_state(directory, "anything") is None
    assert "unreadable resume state" in capsys.readouterr().out
    assert not (directory / RESUME_FILE).exists()
    clear_stage_resume(tmp_path, "train_segmenter")
    assert list(tmp_path.iterdir()) == []  # .covidct/resume/<stage> and its empty parents are gone


if __name__ == "__main__":
    main(*sys.argv[1:])
