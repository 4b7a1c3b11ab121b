"""Stage audit_data: no patient and no picture in two splits, checked before any training starts.

Writes ``reports/audit/report.json`` (the metrics), ``report.md`` and ``pairs.png`` even when
it fails, so the reason can be read and looked at; then a leak that params.yaml does not
allow ends the stage with one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import AuditConfig, section
from covidct.datasets import CC_CCII, COVID_CT, LUNG_SEG, DatasetError
from covidct.hygiene.audit import DatasetAudit, LeakageError, audit_dataset, leak_message
from covidct.hygiene.patients import covid_ct_patients, lung_patients, noncovid_split_lists, patient_overlap
from covidct.hygiene.report import report_json, report_markdown, save_pair_gallery
from covidct.paths import AUDIT_REPORTS, RAW, SPLITS
from covidct.tracking import stage_run

REPORTS = AUDIT_REPORTS
PAIRS_IMAGE = "pairs.png"
CLOSEST_IN_IMAGE = 3  # per dataset, after every duplicate


def covid_ct_images(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The COVID-CT split with each image's patient id from the shipped meta files, and notes on
    where the official NonCOVID patient lists disagree with them."""
    data_root = root / RAW / COVID_CT
    table = pd.read_csv(root / SPLITS / "covid_ct.csv")
    patients = covid_ct_patients(data_root).drop_duplicates("relpath").set_index("relpath")["patient_id"]
    images = table.assign(
        path=[str(data_root / p) for p in table["relpath"]], patient_id=table["relpath"].map(patients)
    )
    notes = []
    lists = noncovid_split_lists(data_root)
    shared = patient_overlap(lists)
    if len(shared):
        notes.append(
            f"meta/CT_NonCOVID_*_id.csv list {len(shared)} patient(s) in more than one split: {', '.join(shared['patient_id'][:5])}"
        )
    noncovid = images[images["relpath"].str.startswith("CT_NonCOVID/") & images["patient_id"].notna()]
    listed = set(zip(lists["patient_id"], lists["split"], strict=True))
    off_list = noncovid[[(p, s) not in listed for p, s in zip(noncovid["patient_id"], noncovid["split"], strict=True)]]
    if len(off_list):
        notes.append(
            f"{len(off_list)} NonCOVID image(s) whose patient is not in its split's meta/CT_NonCOVID_<split>_id.csv, e.g. {off_list['relpath'].iloc[0]}"
        )
    else:
        notes.append(
            f"every NonCOVID image's patient is in its split's meta/CT_NonCOVID_<split>_id.csv ({len(noncovid)} images)"
        )
    return images[["relpath", "path", "split", "label", "patient_id"]], notes


def lung_images(root: Path) -> pd.DataFrame:
    """The lung split with each slice's patient from manifest.csv."""
    data_root = root / RAW / LUNG_SEG
    manifest = pd.read_csv(data_root / "manifest.csv")
    for column in ("id", "patient_id"):
        if column not in manifest.columns:
            raise DatasetError(f"{data_root / 'manifest.csv'}: column {column!r} is missing")
    images = lung_patients(pd.read_csv(root / SPLITS / "lung_seg.csv"), manifest)
    return images.assign(path=[str(data_root / p) for p in images["relpath"]], label=None)[
        ["relpath", "path", "split", "label", "patient_id"]
    ]


def cc_ccii_images(root: Path) -> pd.DataFrame:
    """The CC-CCII split; its patients are the linked groups the split was made by."""
    table = pd.read_csv(root / SPLITS / "cc_ccii.csv")
    return table.assign(
        path=[str(root / RAW / CC_CCII / p) for p in table["relpath"]], patient_id=table["patient_group"]
    )[["relpath", "path", "split", "label", "patient_id"]]


def gallery_pairs(root: Path, audits: list[DatasetAudit]) -> list[tuple[Path, Path, str, str]]:
    """Every duplicate pair, then the closest other pairs of each dataset, with captions."""
    pairs = []
    for audit, folder in zip(audits, (COVID_CT, LUNG_SEG, CC_CCII), strict=True):
        shown = pd.concat(
            [audit.duplicates.assign(note="DUPLICATE"), audit.closest.head(CLOSEST_IN_IMAGE).assign(note="not flagged")]
        )
        for row in shown.itertuples():
            allowed = " (allowed)" if row.allowed else ""
            score = f"d={row.distance}" + (f", {row.inliers} inliers" if row.inliers >= 0 else "")
            pairs.append(
                (
                    root / RAW / folder / row.relpath_a,
                    root / RAW / folder / row.relpath_b,
                    f"{row.note}{allowed} {score}\n{row.split_a}: {row.relpath_a[-44:]}",
                    f"{audit.name}\n{row.split_b}: {row.relpath_b[-44:]}",
                )
            )
    return pairs


def run(params: dict[str, Any], root: Path) -> None:
    config: AuditConfig = section(params, "audit")
    link_distance = section(params, "cc_ccii_split").link_distance
    settings = dataclasses.asdict(config) | {"cc_ccii_link_distance": link_distance}
    logged = {k: v for k, v in settings.items() if k != "allowed_pairs"} | {
        "n_allowed_pairs": len(config.allowed_pairs)
    }
    with stage_run("audit_data", {"audit": logged}):
        start = time.perf_counter()
        covid, covid_notes = covid_ct_images(root)
        thresholds = (config.near_duplicate_distance, config.verify_distance, config.min_keypoint_inliers)
        audits = [
            audit_dataset(COVID_CT, covid, *thresholds, allowed_pairs=config.allowed_pairs, progress=True),
            audit_dataset(LUNG_SEG, lung_images(root), *thresholds, allowed_pairs=config.allowed_pairs, progress=True),
            # CC-CCII slices are all body-cropped and resized alike, so a re-cropped copy (what the
            # keypoints are for) is not the risk; the same scan under two ids is, at <= link_distance.
            audit_dataset(
                CC_CCII,
                cc_ccii_images(root),
                link_distance,
                link_distance,
                config.min_keypoint_inliers,
                config.allowed_pairs,
                progress=True,
            ),
        ]
        audits[0].notes[:0] = covid_notes
        verdict = leak_message(audits, config.allow_patient_overlap, config.allow_duplicates)
        save_pair_gallery(gallery_pairs(root, audits), root / REPORTS / PAIRS_IMAGE)
        seconds = time.perf_counter() - start
        report = report_json(audits, verdict is None)
        write_text_atomic(root / REPORTS / "report.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(root / REPORTS / "report.md", report_markdown(audits, settings, verdict, PAIRS_IMAGE))
        mlflow.log_metrics(
            {f"{a.name}.{k}": float(v) for a in audits for k, v in a.summary().items() if not isinstance(v, dict)}
            | {"audit_seconds": seconds}
        )
        for name in ("report.json", "report.md", PAIRS_IMAGE):
            mlflow.log_artifact(str(root / REPORTS / name))
        for audit in audits:
            s = audit.summary()
            print(
                f"{audit.name}: {s['images']} images, {s['patients']} patients; {s['patient_overlap']} patient(s) in two splits; "
                f"{s['identical_file_pairs'] + s['identical_pixel_pairs'] + s['near_duplicate_pairs']} duplicate pair(s) across splits "
                f"({s['duplicate_pairs_allowed']} allowed in params.yaml)"
            )
        print(f"audit took {seconds:.1f} s; report in {REPORTS / 'report.md'}")
        if verdict:
            raise LeakageError(verdict)
