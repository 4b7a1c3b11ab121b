"""The audit as JSON, Markdown and a gallery of the closest cross-split pairs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.atomic import atomic_path
from covidct.hygiene.audit import DatasetAudit
from covidct.hygiene.fingerprints import HASH_BITS
from covidct.images import read_grayscale


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def report_json(audits: Sequence[DatasetAudit], passed: bool) -> dict[str, Any]:
    """The machine-readable report: a numeric summary per dataset (what ``dvc metrics`` shows) and the pairs.

    Training stages depend on this file, so it holds only findings: no timing and no settings
    (dvc.lock has those), and an unchanged audit result leaves it byte-identical.
    """
    return {
        "passed": passed,
        **{audit.name: audit.summary() for audit in audits},
        "details": {
            audit.name: {
                "patient_overlap": _records(audit.patients),
                "duplicates": _records(audit.duplicates),
                "closest_not_flagged": _records(audit.closest),
                "notes": audit.notes,
            }
            for audit in audits
        },
    }


def _pair_table(frame: pd.DataFrame, with_kind: bool) -> list[str]:
    head = "| split a | image a | label a | split b | image b | label b | pHash distance | keypoint inliers |" + (
        " kind | allowed |" if with_kind else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in frame.itertuples():
        inliers = "-" if row.inliers < 0 else str(row.inliers)
        cells = [
            row.split_a,
            f"`{row.relpath_a}`",
            _label(row.label_a),
            row.split_b,
            f"`{row.relpath_b}`",
            _label(row.label_b),
            str(row.distance),
            inliers,
        ]
        if with_kind:
            cells += [row.kind, "yes" if row.allowed else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _label(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def report_markdown(
    audits: Sequence[DatasetAudit], settings: Mapping[str, Any], verdict: str | None, image_name: str
) -> str:
    """A readable report: the verdict, per-dataset counts, every duplicate pair and the closest others.
    No clock reading: the same data gives the same bytes (the audit's time goes to MLflow)."""
    lines = [
        "# Data audit: splits before training",
        "",
        f"**{'FAILED: ' + verdict if verdict else 'Passed'}**",
        "",
        "Settings (params.yaml `audit`): "
        + ", ".join(
            f"`{k}` = {v if not isinstance(v, (list, tuple)) else f'{len(v)} pair(s)'}" for k, v in settings.items()
        )
        + ".",
        "",
        f"Near-duplicates: pHash ({HASH_BITS} bits, imagehash) of each image decoded to grey and trimmed to the body; a pair within "
        f"`near_duplicate_distance` bits is the same picture, and a pair within `verify_distance` bits is the same picture when at least "
        f"`min_keypoint_inliers` ORB keypoints agree on one crop-and-scale transform. Identical bytes or decoded pixels always count.",
        "",
        "| | " + " | ".join(a.name for a in audits) + " |",
        "|---|" + "---:|" * len(audits),
    ]
    summaries = [a.summary() for a in audits]
    for key in summaries[0] if summaries else []:
        values = [
            s[key] if not isinstance(s[key], dict) else " / ".join(str(v) for v in s[key].values()) for s in summaries
        ]
        lines.append(
            f"| {key.replace('_', ' ')}{' (train / val / test)' if isinstance(summaries[0][key], dict) else ''} | "
            + " | ".join(map(str, values))
            + " |"
        )
    for audit in audits:
        lines += ["", f"## {audit.name}", ""]
        if len(audit.patients):
            lines += ["Patients in more than one split:", "", "| patient | splits | images |", "|---|---|---|"]
            lines += [f"| {r.patient_id} | {r.splits} | {r.images} |" for r in audit.patients.itertuples()]
        else:
            lines.append("No patient id is in more than one split.")
        lines.append("")
        if len(audit.duplicates):
            lines += ["Duplicate pictures across splits:", ""] + _pair_table(audit.duplicates, with_kind=True)
        else:
            lines.append("No duplicate picture across splits.")
        if len(audit.closest):
            lines += [
                "",
                "Closest cross-split pairs that are **not** counted as duplicates (most keypoint inliers first), for a human to look at:",
                "",
            ]
            lines += _pair_table(audit.closest, with_kind=False)
        if audit.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in audit.notes]
    lines += ["", f"![duplicates and closest pairs]({image_name})", ""]
    return "\n".join(lines)


def save_pair_gallery(
    pairs: Sequence[tuple[Path, Path, str, str]], path: str | os.PathLike[str], max_side: int = 256
) -> None:
    """One row per pair: both images side by side, each with its caption, and the pair's title on the left tile.

    ``pairs`` holds (image a, image b, caption a, caption b); written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, len(pairs))
    dpi = 100
    cell = max_side / dpi
    fig = Figure(figsize=(2 * cell, rows * (0.8 * cell + 0.35)), dpi=dpi)
    FigureCanvasAgg(fig)
    if not pairs:
        fig.text(0.5, 0.5, "no cross-split pair to show", ha="center", va="center")
    for r, (a, b, caption_a, caption_b) in enumerate(pairs):
        for c, (image, caption) in enumerate(((a, caption_a), (b, caption_b))):
            ax = fig.add_subplot(rows, 2, 2 * r + c + 1)
            ax.set_axis_off()
            ax.imshow(read_grayscale(image), cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            ax.set_title(caption, fontsize=6.5)
    fig.tight_layout(pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
