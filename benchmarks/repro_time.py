"""How long the default ``dvc repro`` takes, stage by stage: the issues bound it (60 minutes on
this 2-core machine), and a recipe that grows a network is only adopted with the figure beside it.

    python benchmarks/repro_time.py             # dvc repro --force: every stage, as a fresh clone runs it
    python benchmarks/repro_time.py --stale     # only what changed since dvc.lock (not the bound)

Run from the repository root; writes ``reports/benchmarks/repro_time.json``. Each stage's time runs
from DVC's "Running stage" line to the next one (or to the end), so it holds DVC's own hashing and
caching of that stage's outputs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from side_by_side import save
from suite_time import cpu_model, import_seconds

OUT = Path("reports/benchmarks/repro_time.json")
STAGE = re.compile(r"^Running stage '([^']+)'")


def timed_repro(force: bool) -> dict[str, Any]:
    """Runs dvc repro, echoing its output, and times each stage it runs."""
    command = ["dvc", "repro", *(["--force"] if force else [])]
    started = time.perf_counter()
    stages: list[tuple[str, float]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if match := STAGE.match(line.strip()):
                stages.append((match[1], time.perf_counter()))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"dvc repro failed (exit {proc.returncode}); not recorded")
    ends = [t for _, t in stages[1:]] + [started + wall]
    return {
        "command": " ".join(command),
        "wall_minutes": round(wall / 60, 1),
        "stage_minutes": {name: round((end - begin) / 60, 2) for (name, begin), end in zip(stages, ends, strict=True)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stale", action="store_true", help="run only the stages dvc status calls changed")
    args = parser.parse_args()
    reference = import_seconds(5)
    run = timed_repro(force=not args.stale)
    save(
        {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "import_torch_mlflow_monai_seconds": round(reference, 2),
            **run,
        },
        OUT,
    )


if __name__ == "__main__":
    main()
