"""The lung and lesion nets at two (or more) epoch budgets over seeds, paired slice by slice: what
the 60-minute bound's shorter training costs in Dice (``covidct.levers.segmenter_budget``).

    python scripts/segmenter_budget.py \\
        --arm study=segmenter.epochs=24,lesion.epochs=20 --arm bound=segmenter.epochs=18,lesion.epochs=10 \\
        --seeds 0 1 --weights-from bound:0=models

The first arm is the base. ``--weights-from ARM:SEED=DIR`` scores the weights a ``dvc repro`` of
that arm's settings wrote to ``DIR`` (a ``models/`` folder) instead of training them again.
Writes ``reports/segmenter/budget.{json,md}``; runs are kept in ``levers/segmenter_budget/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from covidct.atomic import write_text_atomic
from covidct.config import ConfigError
from covidct.levers.segmenter_budget import budget_markdown, compare_budgets
from covidct.paths import SEGMENTER_REPORTS
from covidct.runtime import configure_threads, select_device


def arm(text: str) -> tuple[str, dict[str, Any]]:
    name, equals, overrides = text.partition("=")
    pairs = [pair.split("=", 1) for pair in overrides.split(",") if pair]
    if not name or not equals or any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=key=value,key=value")
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def weights(text: str) -> tuple[tuple[str, int], Path]:
    key, _, folder = text.partition("=")
    name, _, seed = key.partition(":")
    if not folder or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"--weights-from {text!r}: expected ARM:SEED=DIR")
    return (name, int(seed)), Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arm",
        type=arm,
        action="append",
        required=True,
        help="NAME=key=value,... (first: the base; NAME= is params.yaml)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--weights-from", type=weights, action="append", default=[])
    args = parser.parse_args()
    root = Path.cwd()
    configure_threads()
    try:
        record = compare_budgets(root, dict(args.arm), args.seeds, select_device(), dict(args.weights_from))
    except ConfigError as error:  # a bad override or a missing params.yaml: one line, not a traceback
        sys.exit(f"error: {error}")
    out = root / SEGMENTER_REPORTS
    write_text_atomic(out / "budget.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / "budget.md", budget_markdown(record))
    print(budget_markdown(record))


if __name__ == "__main__":
    main()
