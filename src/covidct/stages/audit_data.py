"""Stage audit_data: no patient and no picture in two splits, checked before any training starts.

Writes ``reports/audit/report.json`` (the metrics), ``report.md`` and ``pairs.png`` even when
it fails, so the reason can be read and looked at; then a leak that params.yaml does not
allow ends the stage with one line naming it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.catalog import load_source
from covidct.config import AuditConfig, CcCciiSplitConfig, declared_sources
from covidct.datasets import LUNG_SEG, DatasetError
from covidct.hygiene.audit import DatasetAudit, LeakageError, audit_dataset, leak_message
from covidct.hygiene.patients import lung_patients, noncovid_split_lists, patient_overlap
from covidct.hygiene.report import report_json, report_markdown, save_pair_gallery
from covidct.paths import AUDIT_REPORTS, LUNG_SPLIT, RAW
from covidct.tracking import stage_run

REPORTS = AUDIT_REPORTS
PAIRS_IMAGE = "pairs.png"
CLOSEST_IN_IMAGE = 3  # per dataset, after every duplicate
ACROSS = "across sources"  # the audit of every source against the others


def covid_ct_notes(data_root: Path, images: pd.DataFrame) -> list[str]:
    """Where COVID-CT's official NonCOVID patient lists disagree with the patient ids of its meta files."""
    notes = []
    lists = noncovid_split_lists(data_root)
    shared = patient_overlap(lists)
    if len(shared):
        notes.append(
            f"meta/CT_NonCOVID_*_id.csv list {len(shared)} patient(s) in more than one split: {', '.join(shared['patient_id'][:5])}"
        )
    noncovid = images[images["relpath"].str.startswith("CT_NonCOVID/") & (images["patient_id"] != images["relpath"])]
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
    return notes


def source_images(root: Path, name: str) -> pd.DataFrame:
    """A declared source's split (covidct.catalog) as the audit reads it: its patients are the split's unit."""
    table = load_source(root, name)
    return table.assign(patient_id=table["patient"])[["relpath", "path", "split", "label", "patient_id"]]


def lung_images(root: Path) -> pd.DataFrame:
    """The lung split with each slice's patient from manifest.csv."""
    data_root = root / RAW / LUNG_SEG
    manifest = pd.read_csv(data_root / "manifest.csv")
    for column in ("id", "patient_id"):
        if column not in manifest.columns:
            raise DatasetError(f"{data_root / 'manifest.csv'}: column {column!r} is missing")
    images = lung_patients(pd.read_csv(root / LUNG_SPLIT), manifest)
    return images.assign(path=[str(data_root / p) for p in images["relpath"]], label=None)[
        ["relpath", "path", "split", "label", "patient_id"]
    ]


def across_sources(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every source's images as one table whose "split" is the source: a picture found in two
    sources would sit on both sides of a leave-one-source-out fold."""
    return pd.concat(
        [
            t.assign(relpath=name + "/" + t["relpath"], split=name, patient_id=name + "/" + t["patient_id"])
            for name, t in tables.items()
        ],
        ignore_index=True,
    )


def gallery_pairs(root: Path, audits: list[DatasetAudit]) -> list[tuple[Path, Path, str, str]]:
    """Every duplicate pair, then the closest other pairs of each dataset, with captions."""
    pairs = []
    for audit in audits:
        folder = "" if audit.name == ACROSS else audit.name  # across sources, relpaths start with the source
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
    config: AuditConfig = AuditConfig.of(params)
    link_distance = CcCciiSplitConfig.of(params).link_distance
    declared = declared_sources(params)
    settings = config.model_dump() | {"cc_ccii_link_distance": link_distance}
    logged = {k: v for k, v in settings.items() if k != "allowed_pairs"} | {
        "n_allowed_pairs": len(config.allowed_pairs)
    }
    with stage_run("audit_data", {"audit": logged}):
        start = time.perf_counter()
        thresholds = (config.near_duplicate_distance, config.verify_distance, config.min_keypoint_inliers)
        tables = {name: source_images(root, name) for name in declared}
        audits = [
            audit_dataset(LUNG_SEG, lung_images(root), *thresholds, allowed_pairs=config.allowed_pairs, progress=True)
        ]
        for name, source in declared.items():
            # Slices split here by patient (CC-CCII) are all body-cropped and resized alike, so a re-cropped copy
            # (what the keypoints are for) is not the risk; the same scan under two ids is, at <= link_distance.
            near = (
                (link_distance, link_distance, config.min_keypoint_inliers)
                if source.split == "patients"
                else thresholds
            )
            audit = audit_dataset(name, tables[name], *near, allowed_pairs=config.allowed_pairs, progress=True)
            if source.split == "lists":
                audit.notes[:0] = covid_ct_notes(root / RAW / name, tables[name])
            audits.append(audit)
        if len(tables) > 1:  # pHash alone: keypoints over every pair of sources would take hours
            pooled = across_sources(tables)
            audits.append(
                audit_dataset(
                    ACROSS,
                    pooled,
                    config.near_duplicate_distance,
                    config.near_duplicate_distance,
                    config.min_keypoint_inliers,
                    config.allowed_pairs,
                    progress=True,
                )
            )
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
