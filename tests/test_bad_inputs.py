"""Bad inputs at every entry point: one clear message naming the file or key, nothing written lost.

Entry points and what each gets (``CASES`` counts them):

* the image readers: only the kinds ``test_images.py`` does not already cover (a real JPEG cut
  off inside its EXIF header, a JPEG whose Huffman table is garbage, a 30000 x 30000 JPEG);
* the DVC stages, run as DVC runs them (``pipelines/<stage>.py`` as its own process, in a small
  working directory laid out like the repository after ``prepare_data`` on the tiny profile),
  with a bad file put in place or a bad key in ``params.yaml``: exit status 2, exactly one
  ``error:`` line naming the file or key (progress bars aside), no traceback, and every file in
  the directory byte-identical and untouched afterwards, with no ``.*.tmp*`` left behind.
  ``crop_images`` has run successfully before and meets its bad image in its last batch, after
  it has made crops for the others, so the failed run must leave the earlier outputs as they were;
* ``covidct predict`` in a fresh process, with a model registered in a temporary MLflow store:
  every bad file gets its reason in the CSV's ``error`` column, the other files are scored;
* the served model: the pyfunc's ``predict`` in-process with the same payloads (MLflow's REST
  layer, base64 and malformed requests, is tested against a real server in ``test_registry.py``).

PNG holding JPEG bytes, 16-bit, RGBA, palette and 1-pixel images are valid: ``crop_images``
crops them and ``predict`` and the served model score them.

Starting ``python pipelines/<stage>.py`` costs about 10 s of imports (torch, MONAI, MLflow, timm)
on 2 cores, so each stage run here is a process forked from one interpreter that did those
imports once: it runs the same script as ``__main__``, with its own working directory, stdout,
stderr and exit status. One case also runs cold, as DVC starts it, and says the same.
An empty lung mask in the lung set (every one of its masks has lung) is a damaged file: the
segmenter stages stop on it, naming it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from covidct.checkpoints import save_state_dict
from covidct.config import GateConfig, load_params
from covidct.datasets import CLASS_DIRS, SPLITS, covid_ct_split
from covidct.images import ImageReadError, decode_grayscale, read_grayscale
from covidct.profiles import apply_profile, set_params
from covidct.registry.pipeline_model import OUTPUT
from covidct.registry.register import build_and_register
from covidct.segmentation.model import build_segmenter
from covidct.stages import prepare_data
from helpers.configs import make_config
from helpers.images import png_header_only
from helpers.paths import DATA, REPO
from helpers.tiny import save_tiny_lesion, save_tiny_networks

pytestmark = [pytest.mark.slow, pytest.mark.data]

COVID = DATA / "covid-ct"
LUNG = DATA / "lung-seg"
CC_CCII = DATA / "cc-ccii"
SARS = DATA / "sars-cov-2-ct"
REAL_PNG = COVID / "CT_COVID" / "kjr-21-e25-p1-6.png"
REAL_JPEG = COVID / "CT_NonCOVID" / "1%0.jpg"  # 12 KB of EXIF before its pixels
JPEG_AS_PNG = COVID / "CT_COVID" / "2020.03.16.20035105-p6-64-1.png"  # JPEG bytes behind a .png name
RGBA_PNG = (
    COVID / "CT_COVID" / "2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour-p3-89%0.png"
)

# ---------------------------------------------------------------- the files


def _jpeg_segments(data: bytes) -> dict[int, int]:
    """Offset of the first segment of each marker of a JPEG's header (up to its scan)."""
    offsets, i = {}, 2
    while data[i + 1] != 0xDA:
        offsets.setdefault(data[i + 1], i)
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return offsets


def _corrupt_png() -> bytes:
    data = bytearray(REAL_PNG.read_bytes())
    start = data.index(b"IDAT") + 4 + 2  # past the zlib header
    data[start : start + 200] = b"\xff" * 200
    return bytes(data)


def _corrupt_jpeg() -> bytes:
    """The Huffman table's 16 code counts overwritten: libjpeg refuses it. (Garbage inside the
    entropy-coded pixels has no checksum and decodes to wrong pixels; no reader can tell.)"""
    data = bytearray(REAL_JPEG.read_bytes())
    dht = _jpeg_segments(bytes(data))[0xC4]
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def _jpeg_header_only(width: int, height: int) -> bytes:
    """A baseline grayscale JPEG header declaring width x height, and no pixel data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\xff\xd9"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


#: kind -> (bytes, or None for a missing file; a fragment of the reason, lower case)
BAD = {
    "truncated_png": (lambda: REAL_PNG.read_bytes()[: REAL_PNG.stat().st_size // 2], "truncated or corrupt png data"),
    "truncated_jpeg": (
        lambda: REAL_JPEG.read_bytes()[: REAL_JPEG.stat().st_size // 2],
        "truncated or corrupt jpeg header",
    ),
    "corrupt_png": (_corrupt_png, "truncated or corrupt png data"),
    "corrupt_jpeg": (_corrupt_jpeg, "truncated or corrupt jpeg data"),
    "bomb_30000x30000": (lambda: png_header_only(30000, 30000), "too many pixels"),
    "empty": (lambda: b"", "empty file"),
    "text": (lambda: b"patient 17, slice 40: see the report\n", "not an image"),
    "missing": (lambda: None, "file not found"),
}


def _gray(path: Path) -> Image.Image:
    return Image.fromarray(read_grayscale(path))


def _as_jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("L").save(out, format="JPEG", quality=90)
    return out.getvalue()


#: Valid but unusual: kind -> bytes made from a given image (the stage's own, or a real one for predict).
VALID = {
    "jpeg_in_png": _as_jpeg,
    "sixteen_bit": lambda image: _png(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)),
    "rgba": lambda image: _png(image.convert("RGBA")),
    "palette": lambda image: _png(image.convert("L").quantize(64)),
    "one_pixel": lambda image: _png(Image.new("L", (1, 1), 90)),
}


def _valid_payload(kind: str) -> bytes:
    """Real files where the dataset has them (JPEG behind .png, RGBA), else made from a real image."""
    real = {"jpeg_in_png": JPEG_AS_PNG, "rgba": RGBA_PNG}
    return real[kind].read_bytes() if kind in real else VALID[kind](_gray(REAL_PNG))


def _put(path: Path, data: bytes | None) -> None:
    path.unlink(missing_ok=True)
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@contextmanager
def _replaced(path: Path, data: bytes | None) -> Iterator[None]:
    """``path`` holds ``data`` (None: is missing) inside the block, its old bytes after it."""
    old = path.read_bytes() if path.exists() else None
    _put(path, data)
    try:
        yield
    finally:
        _put(path, old)


# ---------------------------------------------------------------- 1. the image readers (beyond test_images.py)

READER_CASES = {
    "jpeg_cut_inside_its_exif_header": (BAD["truncated_jpeg"][0], "truncated or corrupt jpeg header"),
    "jpeg_with_a_garbage_huffman_table": (_corrupt_jpeg, "truncated or corrupt jpeg data"),
    "jpeg_bomb_30000x30000": (lambda: _jpeg_header_only(30000, 30000), "too many pixels"),
}


@pytest.mark.parametrize("kind", READER_CASES)
def test_reader_names_the_file_and_the_reason(tmp_path: Path, kind: str) -> None:
    make, reason = READER_CASES[kind]
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(make())
    with pytest.raises(ImageReadError) as info:
        read_grayscale(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value).lower()
    with pytest.raises(ImageReadError, match=re.escape(f"upload.jpg: {info.value.reason}")):
        decode_grayscale(path.read_bytes(), "upload.jpg")  # the bytes route of predict and serving


# ---------------------------------------------------------------- 2. the pipeline stages

WARM = r"""
import json, os, runpy, sys, traceback
import covidct.stages.audit_data, covidct.stages.crop_images, covidct.stages.evaluate_segmenter
import covidct.stages.prepare_data, covidct.stages.train_classifier, covidct.stages.train_segmenter
import covidct.stages.evaluate_lesion, covidct.stages.train_lesion
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = job["argv"]
            try:
                runpy.run_path(job["argv"][0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""


class WarmPython:
    """One interpreter with the stages imported; each :meth:`run` forks it to run a stage script."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.count = env, logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WARM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(logs / "warm.err").open("w"),
            text=True,
            env=env,
            start_new_session=True,
        )
        assert self._line(300) == "ready", (logs / "warm.err").read_text()[-3000:]

    def _line(self, timeout: float) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.close()
            raise TimeoutError(f"no answer from the stage process in {timeout} s")
        return self.proc.stdout.readline().strip()

    def run(
        self, stage: str, *args: str, cwd: Path, timeout: float = 180, cold: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``python pipelines/<stage>.py args`` in ``cwd``; ``cold``: a fresh interpreter, as DVC starts it."""
        argv = [str(REPO / "pipelines" / f"{stage}.py"), *args]
        if cold:
            return subprocess.run(
                [sys.executable, *argv], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        self.proc.stdin.write(
            json.dumps({"cwd": str(cwd), "argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n"
        )
        self.proc.stdin.flush()
        code = int(self._line(timeout))
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmPython]:
    base = tmp_path_factory.mktemp("stages")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))}
    env |= {
        "COVIDCT_DEVICE": "cpu",
        "COVIDCT_THREADS": "1",  # the machine is shared
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
        "COVIDCT_PIPELINE_RUN": "bad-inputs",
    }
    warm = WarmPython(env, base / "logs")
    yield warm
    warm.close()


def _write_sums(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}" for p in files]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


TINY_PROFILE = yaml.safe_load((REPO / "pipelines/profiles/tiny.yaml").read_text())


@functools.cache
def tiny_rows() -> tuple[pd.DataFrame, dict[str, str], str]:
    """The tiny profile's COVID-CT images; the five that become the odd-but-valid kinds; and the
    one met in crop_images' last batch, after crops of the others are written. Read when first
    asked, so a machine without the data collects the module and skips its tests."""
    tiny = covid_ct_split(COVID, TINY_PROFILE["data"]["subset_per_class"])
    return tiny, dict(zip(VALID, tiny["relpath"][:5], strict=True)), tiny["relpath"].iloc[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source directory like ../shared/data, small: the tiny COVID-CT images (five turned into
    the odd-but-valid kinds) with their own split lists, 6 lung patients x 3 slices, a few
    CC-CCII patients and SARS-CoV-2 CT slices, checksums."""
    tiny, valid_rows, _ = tiny_rows()
    src = tmp_path_factory.mktemp("source")
    covid, lung = src / "covid-ct", src / "lung-seg"
    shutil.copytree(COVID / "meta", covid / "meta")
    for split in SPLITS:
        for class_dir in CLASS_DIRS:
            names = [Path(r).name for r in tiny.query("split == @split")["relpath"] if r.startswith(f"{class_dir}/")]
            (covid / "Data-split").mkdir(exist_ok=True)
            (covid / "Data-split" / f"{split}{class_dir}.txt").write_text("\n".join(names) + "\n")
    for relpath in tiny["relpath"]:
        (covid / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(COVID / relpath, covid / relpath)
    for kind, relpath in valid_rows.items():
        (covid / relpath).write_bytes(VALID[kind](_gray(COVID / relpath)))
    manifest = pd.read_csv(LUNG / "manifest.csv")
    manifest = manifest[manifest["patient_id"].isin(manifest["patient_id"].unique()[:6])].groupby("patient_id").head(3)
    for folder in ("images", "masks", "infection"):
        (lung / folder).mkdir(parents=True)
    for slice_id in manifest["id"]:
        for folder in ("images", "masks", "infection"):
            shutil.copy2(LUNG / folder / f"{slice_id}.png", lung / folder / f"{slice_id}.png")
    manifest.to_csv(lung / "manifest.csv", index=False)
    cc = src / "cc-ccii"  # 3 patients x 2 slices per class
    manifest = pd.read_csv(CC_CCII / "manifest.csv")
    manifest = manifest[
        manifest["patient_id"].isin(
            manifest.groupby("cc_ccii_class")["patient_id"].unique().explode().groupby(level=0).head(3)
        )
    ]
    manifest = manifest.groupby("patient_id").head(2)
    for relpath in manifest["file"]:
        (cc / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CC_CCII / relpath, cc / relpath)
    manifest.to_csv(cc / "manifest.csv", index=False)
    sars = src / "sars-cov-2-ct"  # its first 4 slices of each class and split
    manifest = pd.read_csv(SARS / "manifest.csv").groupby(["split", "label"]).head(4)
    for relpath in manifest["file"]:
        (sars / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SARS / relpath, sars / relpath)
    manifest.to_csv(sars / "manifest.csv", index=False)
    for root in (covid, lung, cc, sars):
        _write_sums(root)
    return src


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, source: Path, stages: WarmPython) -> Path:
    """The repository after prepare_data (tiny profile, on ``source``), a small untrained segmenter
    standing in for train_segmenter's, and one successful crop_images run."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "pipelines" / "profiles", root / "pipelines" / "profiles")
    apply_profile(root, "tiny")
    set_params(
        root, {"data.source_dir": str(source), "crop.min_lung_fraction": 0.0}
    )  # an untrained segmenter: crop what it finds
    prepare_data.run(load_params(root / "params.yaml"), root)
    torch.manual_seed(0)
    save_state_dict(
        root / "models/segmenter/model.safetensors",
        build_segmenter([4, 8, 16]).state_dict(),
        {"channels": [4, 8, 16], "size": 64, "clahe_clip": 7.0, "epoch": 1},
    )
    result = stages.run("crop_images", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file's bytes and identity: a run that rewrote a file with the same bytes (the same
    crops again, then a bad image) would still have replaced it."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in files
    }


PROGRESS_BAR = re.compile(r"\d+/\d+ \[\d|\d+\w* \[\d\d:\d\d")


def _assert_one_clear_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2 and one ``error:`` line holding ``fragments``; nothing else but progress bars."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0] or fragment in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def _run_and_check_nothing_changed(
    stages: WarmPython, root: Path, stage: str, *args: str, cold: bool = False
) -> subprocess.CompletedProcess[str]:
    before = _snapshot(root)
    result = stages.run(stage, *args, cwd=root, cold=cold)
    after = _snapshot(root)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, (
        f"the failed run touched {len(changed)} file(s): {changed[:5]}"
    )  # earlier outputs byte-identical and untouched
    assert not [p for p in root.rglob(".*") if ".tmp" in p.name]  # no temp file or folder left
    return result


def _reason(kind: str) -> str:
    return BAD[kind][1]


@pytest.mark.parametrize("kind", BAD)
def test_crop_images_with_a_bad_image(stages: WarmPython, workdir: Path, kind: str) -> None:
    bad_row = tiny_rows()[2]
    path = workdir / "data/raw/covid-ct" / bad_row
    with _replaced(path, BAD[kind][0]()):
        result = _run_and_check_nothing_changed(stages, workdir, "crop_images")
    _assert_one_clear_line(result, f"error: {path}: ", _reason(kind))


def test_crop_images_started_cold_as_dvc_starts_it(stages: WarmPython, workdir: Path) -> None:
    """The warm fork is only a shortcut: a fresh ``python pipelines/crop_images.py`` says the same."""
    bad_row = tiny_rows()[2]
    path = workdir / "data/raw/covid-ct" / bad_row
    with _replaced(path, BAD["text"][0]()):
        result = _run_and_check_nothing_changed(stages, workdir, "crop_images", cold=True)
    assert (
        _assert_one_clear_line(result)
        == f"error: {path}: not an image: the file contains text, not a known image format"
    )


@pytest.mark.parametrize("kind", VALID)
def test_crop_images_crops_valid_but_unusual_images(workdir: Path, kind: str) -> None:
    valid_rows = tiny_rows()[1]
    boxes = pd.read_csv(workdir / "reports/crop/boxes.csv", keep_default_na=False).set_index("relpath")
    relpath = valid_rows[kind]
    original = read_grayscale(workdir / "data/raw/covid-ct" / relpath)
    crop = read_grayscale(workdir / "data/crops/images" / boxes.loc[relpath, "crop"])
    assert crop.shape == original.shape == (boxes.loc[relpath, "height"], boxes.loc[relpath, "width"])
    assert (original.shape == (1, 1)) == (kind == "one_pixel")


@pytest.mark.parametrize(
    ("stage", "args", "kind"),
    [("audit_data", (), "truncated_jpeg"), ("train_classifier", ("--variant", "raw"), "bomb_30000x30000")],
    ids=["audit_data-truncated_jpeg", "train_classifier_raw-bomb_30000x30000"],
)
def test_other_stages_reading_covid_ct_images(
    stages: WarmPython, workdir: Path, stage: str, args: tuple[str, ...], kind: str
) -> None:
    bad_row = tiny_rows()[2]
    path = workdir / "data/raw/covid-ct" / bad_row
    with _replaced(path, BAD[kind][0]()):
        result = _run_and_check_nothing_changed(stages, workdir, stage, *args)
    _assert_one_clear_line(result, f"error: {path}: ", _reason(kind))


def _lung_path(root: Path, split: str, column: str) -> Path:
    table = pd.read_csv(root / "data/splits/lung_seg.csv")
    return root / "data/raw/lung-seg" / table.loc[table["split"] == split, column].iloc[0]


def _real_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


LUNG_CASES = {
    "mask_of_the_wrong_size": (
        "mask",
        lambda m: _png(Image.fromarray(m).resize((128, 128), Image.Resampling.NEAREST)),
        "mask size 128x128",
    ),
    "mask_not_0_or_255": (
        "mask",
        lambda m: _png(Image.fromarray(np.where(m == 255, 200, m).astype(np.uint8))),
        "values other than 0 and 255: 200",
    ),
    "mask_jpeg_compressed": ("mask", lambda m: _as_jpeg(Image.fromarray(m)), "values other than 0 and 255"),
    "lung_mask_empty": ("mask", lambda m: _png(Image.fromarray(np.zeros_like(m))), "lung mask is empty"),
    "lung_image_is_text": ("image", lambda m: BAD["text"][0](), "not an image"),
}


@pytest.mark.parametrize("case", LUNG_CASES)
def test_train_segmenter_with_a_bad_lung_file(stages: WarmPython, workdir: Path, case: str) -> None:
    column, make, reason = LUNG_CASES[case]
    path = _lung_path(workdir, "train", column)
    with _replaced(path, make(_real_mask(_lung_path(workdir, "train", "mask")))):
        result = _run_and_check_nothing_changed(stages, workdir, "train_segmenter")
    _assert_one_clear_line(result, f"error: {path}: ", reason)


def test_train_lesion_with_an_infection_mask_of_the_wrong_size(stages: WarmPython, workdir: Path) -> None:
    lung = _lung_path(workdir, "train", "mask")
    path = lung.parent.parent / "infection" / lung.name
    with _replaced(path, _png(Image.fromarray(_real_mask(path)).resize((128, 128), Image.Resampling.NEAREST))):
        result = _run_and_check_nothing_changed(stages, workdir, "train_lesion")
    _assert_one_clear_line(result, f"error: {path}: ", "mask size 128x128")


def test_train_lesion_starting_from_a_segmenter_of_other_widths(stages: WarmPython, workdir: Path) -> None:
    params = load_params(workdir / "params.yaml")
    params["lesion"] |= {"init": "segmenter", "channels": [8, 16, 32]}  # the workdir's segmenter: [4, 8, 16]
    with _replaced(workdir / "params.yaml", yaml.safe_dump(params).encode()):
        result = _run_and_check_nothing_changed(stages, workdir, "train_lesion")
    _assert_one_clear_line(
        result, "error: params.yaml: lesion.channels must equal the lung segmenter's [4, 8, 16] when lesion.init"
    )


def test_evaluate_segmenter_with_an_empty_lung_mask(stages: WarmPython, workdir: Path) -> None:
    path = _lung_path(workdir, "test", "mask")
    with _replaced(path, _png(Image.fromarray(np.zeros((256, 256), np.uint8)))):
        result = _run_and_check_nothing_changed(stages, workdir, "evaluate_segmenter")
    _assert_one_clear_line(result, f"error: {path}: ", "lung mask is empty")


def test_prepare_data_with_a_split_list_naming_a_missing_image(stages: WarmPython, workdir: Path, source: Path) -> None:
    listing = source / "covid-ct/Data-split/valCT_NonCOVID.txt"
    sums = source / "covid-ct/SHA256SUMS"
    with _replaced(listing, listing.read_bytes() + b"ghost.png\n"), _replaced(sums, sums.read_bytes()):
        _write_sums(source / "covid-ct")  # the list is consistent with the checksums: only the name is wrong
        result = _run_and_check_nothing_changed(stages, workdir, "prepare_data")
    _assert_one_clear_line(
        result, f"error: {listing}: names 'ghost.png', but {source / 'covid-ct/CT_NonCOVID/ghost.png'} does not exist"
    )


def test_prepare_data_with_a_manifest_split_it_does_not_know(stages: WarmPython, workdir: Path, source: Path) -> None:
    manifest = source / "sars-cov-2-ct/manifest.csv"
    sums = source / "sars-cov-2-ct/SHA256SUMS"
    edited = manifest.read_text().replace(",val,", ",validation,", 1).encode()
    with _replaced(manifest, edited), _replaced(sums, sums.read_bytes()):
        _write_sums(source / "sars-cov-2-ct")  # checksums agree: the split name itself is wrong
        result = _run_and_check_nothing_changed(stages, workdir, "prepare_data")
    _assert_one_clear_line(result, f"error: {manifest}: split 'validation' is not one of")


PARAM_CASES = {
    "unknown_efficientnet_variant": (
        "train_classifier",
        ("--variant", "cropped"),
        "classifier.model",
        "efficientnet_b8",
        "got 'efficientnet_b8'",
    ),
    "tversky_alpha_above_1": ("train_segmenter", (), "segmenter.tversky_alpha", 1.5, "must be in [0, 1], got 1.5"),
    "tversky_beta_below_0": ("train_segmenter", (), "segmenter.tversky_beta", -0.2, "must be in [0, 1], got -0.2"),
    "tversky_gamma_0": ("train_segmenter", (), "segmenter.tversky_gamma", 0, "must be in (0, 5], got 0"),
    "lesion_tversky_alpha_above_1": ("train_lesion", (), "lesion.tversky_alpha", 1.5, "must be in [0, 1], got 1.5"),
    "crop_margin_r_500": ("crop_images", (), "crop.margin", 500, "must be in [-200, 200], got 500"),
    "source_batchnorm_in_the_pipeline": (
        "train_classifier",
        ("--variant", "cropped"),
        "classifier.source_batchnorm",
        True,
        "is a lever-study candidate",
    ),
}


@pytest.mark.parametrize("case", PARAM_CASES)
def test_stage_with_a_parameter_out_of_range(stages: WarmPython, workdir: Path, tmp_path: Path, case: str) -> None:
    stage, args, key, value, reason = PARAM_CASES[case]
    params = load_params(workdir / "params.yaml")
    section, leaf = key.split(".")
    params[section][leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))  # not set_params: it refuses invalid values
    result = _run_and_check_nothing_changed(stages, tmp_path, stage, *args)
    _assert_one_clear_line(result, f"error: params.yaml: {key} ", reason)


def test_bad_parameter_stops_a_stage_started_cold_with_one_clear_line(tmp_path: Path) -> None:
    """As DVC starts a stage: a fresh interpreter, in a directory holding only params.yaml."""
    params = (REPO / "params.yaml").read_text().replace("model: tf_efficientnet_lite0", "model: efficientnet_b9")
    (tmp_path / "params.yaml").write_text(params)
    result = subprocess.run(
        [sys.executable, str(REPO / "pipelines/train_classifier.py"), "--variant", "raw"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "classifier.model" in result.stderr and "efficientnet_b9" in result.stderr


# ---------------------------------------------------------------- 3. covidct predict, 4. the served model

MODEL_NAME = "covidct"  # the default of `covidct predict` (registry.model_name @ registry.alias)
ORDINARY = [COVID / "CT_NonCOVID" / "0.jpg", REAL_PNG]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A temporary MLflow store whose ``covidct@champion`` is a pipeline of small untrained networks."""
    root = tmp_path_factory.mktemp("registry")
    weights = save_tiny_networks(root)
    metrics = {"threshold": 0.5, "val": {"auc": 0.8, "recall": 0.95}, "test": {"auc": 0.7, "recall": 0.9}}
    uri, previous = f"sqlite:///{root / 'mlflow.db'}", os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also sets MLFLOW_TRACKING_URI in os.environ: restored below
    try:
        experiment = mlflow.create_experiment("bad-inputs", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            params = {"classifier": {"model": "efficientnet_b0", "image_size": 64}}
            build_and_register(
                root,
                root / "pipeline",
                MODEL_NAME,
                (*weights, save_tiny_lesion(root)),
                make_config("crop", min_lung_fraction=0.0),
                PICTURE_GATE,
                metrics,
                params,
                (REAL_PNG.name, REAL_PNG.read_bytes()),
            )
        MlflowClient(uri).set_registered_model_alias(MODEL_NAME, "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both the URI and the variable
    return uri, root


#: The gate's picture checks as params.yaml has them; its lung checks off: an untrained segmenter finds no lungs.
PICTURE_GATE = GateConfig(
    **{**yaml.safe_load((REPO / "params.yaml").read_text())["gate"], "min_lung_fraction": 0.0, "min_lung_balance": 0.0}
)
#: Decodable pictures that are no CT slice: the input gate refuses them (a reason, no label).
GATED = {
    "one_pixel": "under the minimum side",
    "all_black": "near-constant image",
    "all_white": "near-constant image",
    "grey_with_noise": "near-constant image",
}
NOT_CT = {
    "all_black": lambda: _png(Image.new("L", (512, 512), 0)),
    "all_white": lambda: _png(Image.new("L", (512, 512), 255)),
    "grey_with_noise": lambda: _png(
        Image.fromarray(np.random.default_rng(0).normal(128, 3, (256, 256)).clip(0, 255).astype(np.uint8))
    ),
}
SCAN_KINDS = [*BAD, *VALID, *NOT_CT]


def _payload(kind: str) -> bytes | None:
    return BAD[kind][0]() if kind in BAD else NOT_CT[kind]() if kind in NOT_CT else _valid_payload(kind)


@pytest.fixture(scope="module")
def predicted(registered: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """``covidct predict`` in a fresh process (no params.yaml: the default model) on one file of
    each kind and two ordinary scans; the CSV indexed by kind."""
    uri, _ = registered
    out = tmp_path_factory.mktemp("predict")
    suffix = {
        "text": ".txt",
        "truncated_jpeg": ".jpg",
        "corrupt_jpeg": ".jpg",
    }  # a file named on the command line is read whatever its suffix
    names = {kind: out / "scans" / f"{kind}{suffix.get(kind, '.png')}" for kind in SCAN_KINDS}
    for kind, path in names.items():
        _put(path, _payload(kind))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "COVIDCT_DEVICE": "cpu",
        "COVIDCT_THREADS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    files = [*map(str, names.values()), *map(str, ORDINARY)]
    result = subprocess.run(
        [sys.executable, "-m", "covidct", "predict", *files, "--out", "p.csv", "--overlays", "overlays"],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    scored = len(set(VALID) - set(GATED)) + len(ORDINARY)
    assert f"{scored} scans scored, {len(BAD)} unreadable, {len(GATED)} refused by the input gate" in result.stdout
    table = pd.read_csv(out / "p.csv", keep_default_na=False)
    assert list(table.columns) == ["file", *OUTPUT] and table["file"].tolist() == files
    assert len(list((out / "overlays").iterdir())) == scored
    return table.set_index(pd.Index([*SCAN_KINDS, "ordinary_jpeg", "ordinary_png"]))


@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_predict_cli(predicted: pd.DataFrame, kind: str) -> None:
    row = predicted.loc[kind]
    if kind in BAD:
        assert _reason(kind) in row["error"].lower() and row["probability"] == "" and row["label"] == ""
    elif kind in GATED:
        assert (
            row["error"].startswith("input gate: ")
            and GATED[kind] in row["error"]
            and row["probability"] == ""
            and row["label"] == ""
        )
    else:
        assert row["error"] == "" and 0.0 <= float(row["probability"]) <= 1.0 and row["label"] in ("COVID", "non-COVID")


def test_predict_cli_still_scores_the_ordinary_scans(predicted: pd.DataFrame) -> None:
    rows = predicted.loc[["ordinary_jpeg", "ordinary_png"]]
    assert (rows["error"] == "").all() and rows["probability"].astype(float).between(0, 1).all()


SERVED_KINDS = [kind for kind in SCAN_KINDS if kind != "missing"]  # a request carries bytes, not paths


@pytest.fixture(scope="module")
def served(registered: tuple[str, Path]) -> pd.DataFrame:
    """The registered model's pyfunc, as ``mlflow models serve`` loads it, on the same payloads."""
    _, root = registered
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COVIDCT_DEVICE", "cpu")  # read when the model loads
        model = mlflow.pyfunc.load_model(str(root / "pipeline"))
    payloads = [_payload(kind) for kind in SERVED_KINDS] + [p.read_bytes() for p in ORDINARY]
    frame = pd.DataFrame({"image": payloads, "name": [*SERVED_KINDS, "ordinary_jpeg", "ordinary_png"]})
    answer = model.predict(frame)
    assert list(answer.columns) == list(OUTPUT) and len(answer) == len(frame)
    return answer.set_index(frame["name"])


@pytest.mark.parametrize("kind", SERVED_KINDS)
def test_served_model(served: pd.DataFrame, predicted: pd.DataFrame, kind: str) -> None:
    row = served.loc[kind]
    if kind in BAD:
        assert _reason(kind) in row["error"].lower() and row["probability"] is None and row["label"] is None
    elif kind in GATED:  # the same refusal `covidct predict` gave
        assert row["error"] == predicted.loc[kind, "error"] and row["probability"] is None and row["label"] is None
    else:  # the same number `covidct predict` gave for the same bytes
        assert row["error"] == "" and row["probability"] == pytest.approx(
            float(predicted.loc[kind, "probability"]), abs=1e-6
        )


#: Cases per entry point (each one test id).
CASES = {
    "image readers": len(READER_CASES),
    "pipeline stages": len(BAD) + 1 + len(VALID) + 2 + len(LUNG_CASES) + 1 + 1 + 1 + 1 + len(PARAM_CASES),
    "covidct predict": len(SCAN_KINDS) + 1,
    "served model": len(SERVED_KINDS),
}
