"""The patient bootstrap behind every interval of ``evaluate_sources``: each resample scored from
confusion and rank counts (what ``patient_metrics_with_ci`` does) against sklearn's metrics on each
resample (what it did before), in alternating rounds, on CC-CCII test-sized data.

    python benchmarks/patient_bootstrap.py --rounds 5

Scores are synthetic (timing does not depend on them); sizes are the committed run's CC-CCII test
split (666 slices, 59 patients) and ``evaluate.n_bootstrap`` from params.yaml. Writes
``reports/benchmarks/patient_bootstrap.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from side_by_side import alternate, save

from covidct.config import load_params
from covidct.metrics import METRIC_NAMES, _patient_resamples, binary_metrics, patient_metrics_with_ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=666)
    parser.add_argument("--patients", type=int, default=59)
    args = parser.parse_args()
    root = Path.cwd()
    n_boot = int(load_params(root / "params.yaml")["evaluate"]["n_bootstrap"])
    rng = np.random.default_rng(0)
    groups = rng.integers(0, args.patients, args.slices)
    labels = (groups % 3 == 0).astype(int)
    scores = np.clip(0.3 * labels + rng.normal(0.4, 0.2, args.slices), 0, 1)

    def counts() -> float:
        started = time.perf_counter()
        patient_metrics_with_ci(labels, scores, groups, 0.5, n_boot, 0)
        return time.perf_counter() - started

    def sklearn() -> float:
        started = time.perf_counter()
        boot = [binary_metrics(labels[i], scores[i], 0.5) for i in _patient_resamples(labels, groups, n_boot, 0)]
        for name in METRIC_NAMES:
            np.percentile([m[name] for m in boot], [2.5, 97.5])
        return time.perf_counter() - started

    timed = alternate({"counts": counts, "sklearn": sklearn}, args.rounds, "seconds")
    timed["speedup"] = timed["sklearn_seconds"] / timed["counts_seconds"]
    save(
        {"slices": args.slices, "patients": args.patients, "n_bootstrap": n_boot, **timed},
        root / "reports/benchmarks/patient_bootstrap.json",
    )


if __name__ == "__main__":
    main()
