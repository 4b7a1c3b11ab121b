"""The test suite's wall time, with what the machine is like beside it: the same code measured on
two days here took 13 min 51 s and 8 min 17 s, so a figure without the machine's own speed
cannot be compared with another. The speed reference is the median time of a fresh interpreter
importing what a stage that runs the networks imports (torch, MLflow, MONAI).

    python benchmarks/suite_time.py                    # the whole suite, as README.md runs it
    python benchmarks/suite_time.py --label quick -- -m "not slow"

Run from the repository root; writes ``reports/benchmarks/suite_time.json`` (one entry per label).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from side_by_side import save

OUT = Path("reports/benchmarks/suite_time.json")
PHASE = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+?)::(\S+)$")
SUMMARY = re.compile(r"^=* ?(\d+ passed.*) in [\d.]+s")


def import_seconds(rounds: int) -> float:
    """Median seconds for a fresh interpreter to import torch, MLflow and MONAI (caches warm)."""
    code = "import torch, mlflow, monai"
    subprocess.run([sys.executable, "-c", code], check=True)  # warm the file and bytecode caches
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_suite(pytest_args: list[str]) -> dict[str, Any]:
    """One run of the suite; the worker-seconds per module come from pytest's own durations."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", *pytest_args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = result.stdout.splitlines()
    if result.returncode != 0:
        sys.exit(f"the suite failed (exit {result.returncode}); not recorded:\n" + "\n".join(lines[-30:]))
    per_module: dict[str, float] = defaultdict(float)
    phases = []
    for line in lines:
        if match := PHASE.match(line.strip()):
            seconds, when, module, test = float(match[1]), match[2], match[3], match[4]
            per_module[Path(module).name] += seconds
            phases.append((seconds, f"{when} {Path(module).name}::{test.split('@')[0]}"))
    summary = next((m[1] for line in lines if (m := SUMMARY.match(line.strip()))), "")
    return {
        "wall_seconds": round(wall, 1),
        "summary": summary,
        "worker_seconds": round(sum(per_module.values()), 1),
        "worker_seconds_per_module": {k: round(v, 1) for k, v in sorted(per_module.items(), key=lambda kv: -kv[1])},
        "slowest_phases": [f"{s:.1f}s {name}" for s, name in sorted(phases, reverse=True)[:12]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="full", help="the entry this run is saved under")
    parser.add_argument("--import-rounds", type=int, default=5)
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    reference = import_seconds(args.import_rounds)
    run = run_suite(args.pytest_args)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result[args.label] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "pytest_args": args.pytest_args,
        "import_torch_mlflow_monai_seconds": round(reference, 2),
        **run,
    }
    save(result, OUT)


if __name__ == "__main__":
    main()
