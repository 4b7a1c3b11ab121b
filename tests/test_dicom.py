"""Compressed DICOM slices and whole series, built from a real lung-seg CT slice.

The slice's uint8 grey levels are mapped to Hounsfield units so that the lung window
(level -600, width 1500) gives them back exactly, stored as signed 16-bit values with the usual
CT rescale (slope 1, intercept -1024), and written uncompressed and in every lossless syntax
something installed can encode: RLE Lossless, JPEG-LS Lossless and JPEG 2000 Lossless through
pydicom's ``Dataset.compress`` (pydicom's own RLE encoder, pyjpegls, pylibjpeg-openjpeg); JPEG
Lossless Process 14 and its SV1 variant, the syntax most hospital CT exports use, through
python-gdcm's ``gdcm.ImageChangeTransferSyntax`` (pydicom 3.0.2 has no JPEG Lossless encoder).
JPEG baseline is lossy (8-bit samples), so it is compared within one grey level.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array

from covidct.images import LUNG_WINDOW_HU, ImageReadError, decode_grayscale, read_grayscale
from covidct.predict import collect_scans, group_studies, predict_files, studies_csv, write_predictions
from covidct.registry.pipeline_model import PipelineModel, TwoStagePipeline
from covidct.series import ORDER_KEYS, read_series
from covidct.verdicts import TopSlices
from helpers.configs import make_config
from helpers.paths import DATA
from helpers.tiny import save_tiny_lesion, save_tiny_networks

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

SLICES = sorted((DATA / "lung-seg" / "images").glob("coronacases_001_*.png"))[:5]
AXIAL = [1, 0, 0, 0, 1, 0]


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    return read_grayscale(SLICES[0])


def ct_dataset(gray: np.ndarray, **attributes: object) -> Dataset:
    """A CT slice whose stored values go back to ``gray`` through the lung window."""
    level, width = LUNG_WINDOW_HU
    hu = np.rint(level - width / 2 + gray.astype(np.float64) * width / 255)  # -1350 .. 150 HU
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = (
        uid.CTImageStorage,
        uid.generate_uid(),
        uid.ExplicitVRLittleEndian,
    )
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CT", "MONOCHROME2", 1
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()  # signed: air is below zero
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **kwargs)
    return buffer.getvalue()


def gdcm_compress(raw: bytes, folder: Path, syntax: str) -> bytes:
    """``raw`` re-encoded by GDCM in ``syntax`` (a ``gdcm.TransferSyntax`` attribute name)."""
    import gdcm

    (folder / "in.dcm").write_bytes(raw)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(folder / "in.dcm"))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(folder / "out.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return (folder / "out.dcm").read_bytes()


def test_hounsfield_mapping_gives_the_slice_back(gray: np.ndarray) -> None:
    ds = ct_dataset(gray)
    assert ds.pixel_array.min() < 0 < ds.pixel_array.max()  # both signs of the int16 range are used
    assert np.array_equal(decode_grayscale(to_bytes(ds), "raw.dcm"), gray)


# (syntax, how it is encoded, the pinned dependency that must decode it without the others)
SYNTAXES = [
    (uid.RLELossless, "pydicom", "pylibjpeg"),
    (uid.JPEGLSLossless, "pydicom", "gdcm"),
    (uid.JPEG2000Lossless, "pydicom", "gdcm"),
    (uid.JPEGLossless, "JPEGLosslessProcess14", "gdcm"),
    (uid.JPEGLosslessSV1, "JPEGLosslessProcess14_1", "gdcm"),
]


@pytest.mark.parametrize(("syntax", "encoder", "plugin"), SYNTAXES, ids=[s[0].keyword for s in SYNTAXES])
def test_compressed_slice_decodes_byte_identical(
    gray: np.ndarray, tmp_path: Path, syntax: uid.UID, encoder: str, plugin: str
) -> None:
    raw = to_bytes(ct_dataset(gray))
    if encoder == "pydicom":
        ds = ct_dataset(gray)
        ds.compress(syntax)
        data = to_bytes(ds)
    else:
        data = gdcm_compress(raw, tmp_path, encoder)
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == syntax and syntax.is_compressed
    assert len(data) < len(raw)
    out = decode_grayscale(data, f"{syntax.keyword}.dcm")
    assert out.dtype == np.uint8 and np.array_equal(out, decode_grayscale(raw, "raw.dcm")) and np.array_equal(out, gray)
    # the decoder pinned for this syntax works alone (no silent fallback to a test-only package)
    assert np.array_equal(pixel_array(io.BytesIO(data), decoding_plugin=plugin), ct_dataset(gray).pixel_array)


def test_lossy_jpeg_baseline_decodes(gray: np.ndarray, tmp_path: Path) -> None:
    level, width = LUNG_WINDOW_HU  # 8-bit samples: the grey level itself, rescaled to HU
    ds = ct_dataset(gray, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0, PixelData=gray.tobytes())
    ds.RescaleSlope, ds.RescaleIntercept = f"{width / 255:.10f}", level - width / 2
    data = gdcm_compress(to_bytes(ds), tmp_path, "JPEGBaselineProcess1")
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    diff = np.abs(decode_grayscale(data, "baseline.dcm").astype(int) - gray)
    assert diff.max() <= 2 and diff.mean() < 0.5


def test_multiframe_dicom_is_refused(gray: np.ndarray) -> None:
    ds = ct_dataset(gray, NumberOfFrames=2)
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(ImageReadError, match="2 frames; give one grayscale slice per file") as info:
        decode_grayscale(to_bytes(ds), "cine.dcm")
    assert str(info.value).startswith("cine.dcm: ")


def _encapsulated(gray: np.ndarray, syntax: str) -> bytes:
    """JPEG-LS data labelled with transfer syntax ``syntax``."""
    ds = ct_dataset(gray)
    ds.compress(uid.JPEGLSLossless)
    ds.file_meta.TransferSyntaxUID = syntax
    return to_bytes(ds, implicit_vr=False, little_endian=True)


def test_syntax_without_decoder_names_it(gray: np.ndarray) -> None:
    private = "1.2.826.0.1.3680043.8.498.1"  # a private syntax no plugin knows
    with pytest.raises(ImageReadError, match=f"transfer syntax {private} \\(unknown to pydicom\\)"):
        decode_grayscale(_encapsulated(gray, private), "private.dcm")
    part2 = uid.UID("1.2.840.10008.1.2.4.92")  # known to pydicom, yet nothing decodes it
    with pytest.raises(ImageReadError, match="no decoder exists") as info:
        decode_grayscale(_encapsulated(gray, part2), "part2.dcm")
    assert part2.name in str(info.value) and part2 in str(info.value)


def test_corrupt_compressed_pixels_name_the_syntax(gray: np.ndarray) -> None:
    ds = ct_dataset(gray)
    ds.compress(uid.JPEGLSLossless)
    broken = copy.deepcopy(ds)
    broken.PixelData = encapsulate([bytes(range(256)) * 8])
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data") as info:
        decode_grayscale(to_bytes(broken), "broken.dcm")
    assert "JPEG-LS Lossless" in str(info.value) and uid.JPEGLSLossless in str(info.value)


def test_missing_decoder_package_is_named(gray: np.ndarray, tmp_path: Path) -> None:
    """A Python without python-gdcm (and pylibjpeg): a JPEG Lossless SV1 slice says what to install."""
    (tmp_path / "sv1.dcm").write_bytes(gdcm_compress(to_bytes(ct_dataset(gray)), tmp_path, "JPEGLosslessProcess14_1"))
    code = (
        "import sys; sys.modules['gdcm'] = sys.modules['pylibjpeg'] = None\n"
        "from covidct.images import read_grayscale, ImageReadError\n"
        "try: read_grayscale(sys.argv[1])\n"
        "except ImageReadError as exc: print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "sv1.dcm")], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith(f"{tmp_path / 'sv1.dcm'}: no installed decoder for DICOM transfer syntax"), out
    assert uid.JPEGLosslessSV1.name in out and "python-gdcm would decode it" in out


# --------------------------------------------------------------------------- series


def write_series(
    folder: Path, zs: list[float], numbers: list[int], names: list[str], **attributes: object
) -> list[np.ndarray]:
    """One slice per z (real slices, in list order) in one series; returns the slices written."""
    study, series = attributes.pop("StudyInstanceUID", uid.generate_uid()), uid.generate_uid()
    slices = [read_grayscale(path) for path in SLICES[: len(zs)]]
    for image, z, number, name in zip(slices, zs, numbers, names, strict=True):
        ds = ct_dataset(image, StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=number, **attributes)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-120.0, -95.5, z], AXIAL
        ds.save_as(folder / name, enforce_file_format=True)
    return slices


def test_series_comes_back_in_position_order(tmp_path: Path) -> None:
    zs = [-30.0, 12.5, -155.0, 0.0, -90.0]
    names = ["IM0003", "b.dcm", "IM0001", "a.dcm", "zz"]  # neither names nor numbers follow z
    slices = write_series(tmp_path, zs, [2, 5, 4, 1, 3], names, SeriesDescription="Lung 1.0")
    (tmp_path / "preview.png").write_bytes(SLICES[0].read_bytes())
    (tmp_path / "README.txt").write_text("exported by PACS\n")
    report = ct_dataset(np.zeros((2, 2), np.uint8))  # a dose report: DICOM without an image
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID = uid.XRayRadiationDoseSRStorage
    del report.PixelData
    report.save_as(tmp_path / "dose", enforce_file_format=True)

    [series] = read_series(tmp_path)
    order = np.argsort(zs)
    assert series.ordered_by == "ImagePositionPatient" and series.description == "Lung 1.0"
    assert series.files == [tmp_path / names[i] for i in order]
    assert series.positions == sorted(zs)
    for path, i in zip(series.files, order, strict=True):
        assert np.array_equal(read_grayscale(path), slices[i])
    assert read_series(reversed(series.files)) == [series]  # a list of files gives the same


def test_oblique_series_is_ordered_along_its_normal(tmp_path: Path) -> None:
    """Sagittal slices: z is the same for all, only x (the normal is -x) says where each lies."""
    write_series(tmp_path, [0.0] * 3, [1, 2, 3], ["s1", "s2", "s3"])
    for name, x in zip(["s1", "s2", "s3"], [10.0, -20.0, 35.0], strict=True):
        ds = pydicom.dcmread(tmp_path / name)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [x, 0.0, 0.0], [0, 1, 0, 0, 0, -1]
        ds.save_as(tmp_path / name)
    [series] = read_series(tmp_path)
    assert [p.name for p in series.files] == ["s3", "s1", "s2"] and series.positions == [-35.0, -10.0, 20.0]


@pytest.mark.parametrize("missing", [0, 1, 2, 3])
def test_series_order_falls_back(tmp_path: Path, missing: int) -> None:
    """Without positions: SliceLocation, then InstanceNumber, then the file name order the slices
    (each gives a different order here)."""
    write_series(tmp_path, [1.0, 3.0, 2.0], [2, 3, 1], ["c", "a", "b"])
    for path, location in zip(sorted(tmp_path.iterdir()), [-1.0, 9.0, 5.0], strict=True):  # a, b, c
        ds = pydicom.dcmread(path)
        ds.SliceLocation = location
        for keyword in ["ImagePositionPatient", "SliceLocation", "InstanceNumber"][:missing]:
            delattr(ds, keyword)
        ds.save_as(path)
    [series] = read_series(tmp_path)
    assert series.ordered_by == ORDER_KEYS[missing]
    assert "".join(p.name for p in series.files) == ["cba", "acb", "bca", "abc"][missing]
    assert series.positions == [[1.0, 2.0, 3.0], [-1.0, 5.0, 9.0], [None] * 3, [None] * 3][missing]


def test_two_series_and_files_without_uids(tmp_path: Path) -> None:
    study = uid.generate_uid()
    write_series(tmp_path, [1.0, 2.0], [1, 2], ["lung1", "lung2"], StudyInstanceUID=study)
    write_series(tmp_path, [2.0, 1.0, 3.0], [1, 2, 3], ["soft1", "soft2", "soft3"], StudyInstanceUID=study)
    for name in ["loose1", "loose2"]:
        ct_dataset(read_grayscale(SLICES[0])).save_as(tmp_path / name, enforce_file_format=True)
    found = read_series(tmp_path)
    assert sorted(len(s.files) for s in found) == [1, 1, 2, 3]
    loose = [s for s in found if s.series_uid is None]
    assert [s.files for s in loose] == [[tmp_path / "loose1"], [tmp_path / "loose2"]] and all(
        s.ordered_by == "file name" for s in loose
    )
    lung, soft = sorted((s for s in found if s.series_uid), key=lambda s: len(s.files))
    assert lung.study_uid == soft.study_uid == study and lung.series_uid != soft.series_uid
    assert [p.name for p in soft.files] == ["soft2", "soft1", "soft3"]


def test_bad_header_names_the_file(tmp_path: Path, gray: np.ndarray) -> None:
    data = to_bytes(ct_dataset(gray, StudyInstanceUID=uid.generate_uid(), SeriesInstanceUID=uid.generate_uid()))
    good = tmp_path / "good.dcm"
    good.write_bytes(data)
    pixel_start = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    for cut in [140, 300, pixel_start - 5, pixel_start + 2]:  # in the file meta, in the dataset, just before the pixels
        bad = tmp_path / f"cut{cut}.dcm"
        bad.write_bytes(data[:cut])
        with pytest.raises(ImageReadError, match="unreadable DICOM header") as info:
            read_series(tmp_path)
        assert str(info.value).startswith(f"{bad}: "), info.value
        with pytest.raises(ImageReadError, match=bad.name):
            read_series([good, bad])
        bad.unlink()
    assert len(read_series(tmp_path)) == 1
    (tmp_path / "notes.txt").write_text("no DICOM here")
    with pytest.raises(ImageReadError, match="notes.txt: not a DICOM file"):
        read_series([good, tmp_path / "notes.txt"])


# ---------------------------------------------------------------- scored by the registered pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> TwoStagePipeline:
    """Small untrained networks, no gate: what matters is that equal pixels get equal scores."""
    root = tmp_path_factory.mktemp("weights")
    return TwoStagePipeline(
        *save_tiny_networks(root),
        make_config("crop", min_lung_fraction=0.0),
        0.5,
        device=torch.device("cpu"),
        study_top=TopSlices(2),
        lesion_path=save_tiny_lesion(root),
    )


def test_jpeg_lossless_export_scores_exactly_like_the_uncompressed_file(
    gray: np.ndarray, pipeline: TwoStagePipeline, tmp_path: Path
) -> None:
    raw = to_bytes(ct_dataset(gray))
    sv1 = gdcm_compress(raw, tmp_path, "JPEGLosslessProcess14_1")  # what hospital CT exports use
    assert pydicom.dcmread(io.BytesIO(sv1)).file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    plain, compressed = pipeline.predict_encoded(["raw.dcm", "sv1.dcm"], [raw, sv1])
    assert (
        plain.error == compressed.error == ""
        and plain.probability == compressed.probability
        and plain.box == compressed.box
    )


def test_a_folder_series_is_one_study_in_slice_order(pipeline: TwoStagePipeline, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    zs, names = [-30.0, 12.5, -155.0, 0.0], ["IM0003", "b.dcm", "IM0001", "a.dcm"]
    write_series(folder, zs, [2, 4, 3, 1], names)
    (folder / "lone.png").write_bytes(SLICES[4].read_bytes())
    files, studies = group_studies(collect_scans([folder])[0])
    dicom = [folder / names[i] for i in np.argsort(zs)]
    assert files[:4] == dicom and files[4] == folder / "lone.png"  # by position, not by name or number
    assert len(set(studies[:4])) == 1 and studies[:4][0] and studies[4] == ""

    predictions = predict_files(pipeline, files)
    table = write_predictions(predictions, tmp_path / "p.csv", studies, pipeline.study_top)
    top_two = np.sort([p.probability for p in predictions[:4]])[-2:].mean()
    assert (
        table["study_probability"][:4].tolist() == pytest.approx([top_two] * 4)
        and table["study_probability"][4] is None
    )
    per_study = pd.read_csv(studies_csv(tmp_path / "p.csv"))
    assert per_study[["slices", "slices_scored", "slices_outside_lungs", "top_k", "top_share"]].values.tolist() == [
        [4, 4, 0, 2, 0.0]
    ]
    summed = sum((p.burden for p in predictions[1:4]), predictions[0].burden)  # the series' lung volume involved
    assert per_study["study_lesion_burden"][0] == pytest.approx(summed.lesion / summed.lung)
    assert per_study["study_probability"][0] == pytest.approx(top_two)
    assert per_study["study_label"][0] == ("COVID" if top_two >= 0.5 else "non-COVID")

    served = PipelineModel()
    served.pipeline = pipeline
    frame = pd.DataFrame({"image": [f.read_bytes() for f in files], "study": [*studies[:4], None]})
    answer = served.predict(None, frame)
    assert (
        answer["study_probability"].tolist()[:4] == table["study_probability"].tolist()[:4]
        and answer["study"][4] is None
    )


def test_an_unreadable_header_in_a_folder_leaves_the_series_grouped(tmp_path: Path) -> None:
    write_series(tmp_path, [5.0, -5.0, 0.0], [1, 2, 3], ["x1", "x2", "x3"])
    (tmp_path / "cut").write_bytes((tmp_path / "x1").read_bytes()[:200])  # DICM marker, header cut short
    files, studies = group_studies(collect_scans([tmp_path])[0])
    assert files == [
        tmp_path / n for n in ("cut", "x2", "x3", "x1")
    ]  # the cut file keeps its place for its error row; the series by z
    assert studies[0] == "" and len(set(studies[1:])) == 1 and studies[1]


def test_a_folder_gives_every_picture_by_content_and_names_what_it_skipped(tmp_path: Path) -> None:
    gray = read_grayscale(SLICES[4])
    Image.fromarray(gray).save(tmp_path / "a.tif")
    Image.fromarray(gray).save(tmp_path / "b.gif")
    (tmp_path / "c").write_bytes(SLICES[4].read_bytes())  # a PNG without a suffix
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "d.png").write_bytes(b"")  # empty: kept, to get its own error row
    found, skipped = collect_scans([tmp_path, tmp_path / "missing.png"])
    names = [p.name for p in found]
    assert names == ["a.tif", "b.gif", "c", "d.png", "missing.png"] and [p.name for p in skipped] == ["notes.txt"]
