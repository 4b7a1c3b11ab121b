"""What the lesion segmenter costs the registered pipeline: the same pipeline with and without its
lesion net (burden off), side by side in alternating rounds, batched throughput on the COVID-CT
test split's raw scans (what ``covidct predict`` does with a folder).

    python benchmarks/lesion_cost.py --rounds 5

Run from the repository root after ``dvc repro`` (reads ``models/pipeline``, the locally saved
registered model). Writes ``reports/benchmarks/lesion_cost.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from side_by_side import alternate, save

from covidct.paths import COVID_CT_SPLIT, PIPELINE, raw
from covidct.predict import load_pipeline
from covidct.runtime import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=64, help="scans per round")
    args = parser.parse_args()
    root = Path.cwd()
    threads = configure_threads()
    pipeline = load_pipeline(str(root / PIPELINE))
    if pipeline.lesion is None:
        raise SystemExit(f"{PIPELINE} has no lesion segmenter: run dvc repro first")
    relpaths = pd.read_csv(root / COVID_CT_SPLIT).query("split == 'test'")["relpath"].head(args.n)
    names = list(relpaths)
    blobs = [(root / raw("covid-ct") / p).read_bytes() for p in names]
    lesion = pipeline.lesion

    def throughput(with_lesion: bool) -> float:
        pipeline.lesion = lesion if with_lesion else None
        started = time.perf_counter()
        pipeline.predict_encoded(names, blobs)
        return len(blobs) / (time.perf_counter() - started)

    result = alternate(
        {"with_lesion": lambda: throughput(True), "without_lesion": lambda: throughput(False)},
        args.rounds,
        "scans_per_s",
    )
    result |= {
        "threads": threads,
        "scans": len(blobs),
        "cost": result["without_lesion_scans_per_s"] / result["with_lesion_scans_per_s"],
    }
    save(result, root / "reports/benchmarks/lesion_cost.json")


if __name__ == "__main__":
    main()
