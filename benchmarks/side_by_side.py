"""What the side-by-side benchmarks share: contenders measured in alternating rounds, so a change
in the machine's speed during the run hits each alike, and medians saved to reports/benchmarks/."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covidct.atomic import write_text_atomic


def alternate(contenders: dict[str, Callable[[], float]], rounds: int, unit: str = "images_per_s") -> dict[str, Any]:
    """Each contender returns one round's figure (images/s unless ``unit`` says otherwise); one
    warm-up round each, then ``rounds``."""
    for run in contenders.values():
        run()
    speeds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            speeds[name].append(run())
    return {f"{name}_{unit}": statistics.median(values) for name, values in speeds.items()} | {
        "rounds": {name: [round(v, 2) for v in values] for name, values in speeds.items()}
    }


def save(result: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
