"""One stage's wall time logging to the team's MLflow server against the local SQLite store, side
by side in alternating rounds, each round a fresh process as `dvc repro` runs it. The stage
rewrites its own outputs with the same bytes; its runs go to a ``covidct-benchmark`` experiment.

    python benchmarks/tracking_server.py --server http://127.0.0.1:5000 --stage evaluate_segmenter

Start the server first as docs/team.md says. Writes ``reports/benchmarks/tracking_server.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from side_by_side import alternate, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the team server's URL, e.g. http://127.0.0.1:5000")
    parser.add_argument(
        "--stage", action="append", help="pipelines/<stage>.py (repeatable; default evaluate_segmenter)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path.cwd()
    local = Path(tempfile.mkdtemp(prefix="covidct-sqlite-")) / "mlflow.db"
    stores = {"sqlite": f"sqlite:///{local}", "server": args.server}
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}

    def stage_seconds(stage: str, uri: str) -> Callable[[], float]:
        def run() -> float:
            env = base | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "covidct-benchmark"}
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, f"pipelines/{stage}.py"], cwd=root, env=env, check=True, capture_output=True
            )
            return time.perf_counter() - started

        return run

    result: dict[str, object] = {"server": args.server, "rounds": args.rounds}
    for stage in args.stage or ["evaluate_segmenter"]:
        timed = alternate({name: stage_seconds(stage, uri) for name, uri in stores.items()}, args.rounds, "seconds")
        timed["server_over_sqlite"] = timed["server_seconds"] / timed["sqlite_seconds"]
        result[stage] = timed
    save(result, root / "reports/benchmarks/tracking_server.json")


if __name__ == "__main__":
    main()
