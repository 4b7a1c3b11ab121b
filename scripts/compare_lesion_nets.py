"""Two lesion-segmenter checkpoints on the lung set's VALIDATION patients, paired: per-slice Dice
of each and the difference's 95 % interval (slices resampled, and the 2 validation patients
resampled), so a choice between recipes (``lesion.init`` none against segmenter) is made on
validation slices, never on the test patients ``evaluate_lesion`` reports.

    python scripts/compare_lesion_nets.py A.safetensors B.safetensors --names scratch lung-init

Writes ``reports/lesion/comparison.json`` (B minus A), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig, PreprocessConfig, load_params
from covidct.experiments.scoring import slice_dice
from covidct.metrics import mean_with_ci
from covidct.paths import LESION_REPORTS
from covidct.runtime import configure_threads
from covidct.segmentation.data import load_lung_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", nargs=2, default=["a", "b"])
    parser.add_argument("--out", type=Path, default=LESION_REPORTS / "comparison.json", help="relative to the root")
    args = parser.parse_args()
    root = Path.cwd()
    configure_threads()
    params = load_params(root / "params.yaml")
    evaluate = EvaluateConfig.of(params)
    table, images, _, lesions = load_lung_split(root, "val", PreprocessConfig.of(params), lesions=True)
    cpu = torch.device("cpu")
    a, b = slice_dice(args.a, images, lesions, cpu), slice_dice(args.b, images, lesions, cpu)
    groups = table["patient_id"].to_numpy()
    boot = {"n_boot": evaluate.n_bootstrap, "seed": evaluate.seed}
    record = {
        "split": "val",
        "slices": len(table),
        "patients": int(table["patient_id"].nunique()),
        args.names[0]: mean_with_ci(a, **boot),
        args.names[1]: mean_with_ci(b, **boot),
        "difference_slices": mean_with_ci(b - a, **boot),
        "difference_patients": mean_with_ci(b - a, groups, **boot),
    }
    write_text_atomic(root / args.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
