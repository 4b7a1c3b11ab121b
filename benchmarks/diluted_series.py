"""Study verdicts on series as a whole chest CT shows them: every candidate aggregation (the top
1, 3, 5 or 10 slice scores, the top 5, 10, 20 or 30 % of a series' slices, or all of them) on the trained sources' test scans as they are and diluted, each
scan made only a share of a series and the rest other scans' Normal slices
(``covidct.source_figures.diluted_series``, what evaluate_sources chooses the aggregation on, with the validation scans).

    python benchmarks/diluted_series.py

Reads the slice scores the last ``dvc repro`` wrote (``reports/sources/scores.csv``: no network
runs), takes each aggregation's study threshold as evaluate_sources does (the validation scans and their
diluted series pooled, ``evaluate.val_recall_floor``), and writes
``reports/benchmarks/diluted_series.json``: per aggregation, the validation AUC it is chosen by and, per
source and share, the test series' AUC, sensitivity and specificity at that threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig, StudyConfig, load_params
from covidct.metrics import binary_metrics
from covidct.paths import SOURCE_REPORTS
from covidct.source_figures import TEST_SEED_OFFSET, TOP_SLICES_CANDIDATES, diluted_at, study_scores, with_diluted
from covidct.thresholds import decision_threshold

OUT = Path("reports/benchmarks/diluted_series.json")


def main() -> None:
    root = Path.cwd()
    params = load_params(root / "params.yaml")
    config, study = EvaluateConfig.of(params), StudyConfig.of(params)
    scored = pd.read_csv(root / SOURCE_REPORTS / "scores.csv")
    trained = params["classifier"]["sources"]
    scored = scored[scored["source"].isin(trained)]
    scored = scored.assign(study=scored["source"] + "/" + scored["study"].astype(str))
    val = with_diluted(scored[scored["split"] == "val"], study.dilution, study.seed)
    test = scored[scored["split"] == "test"]
    diluted = diluted_at(test, study.dilution, study.seed + TEST_SEED_OFFSET)  # as evaluate_sources draws them
    series = {"as they are": test} | {
        f"{100 * share:g} %": diluted[diluted["study"].str.endswith(f"@{share:g}")] for share in study.dilution
    }
    results: dict[str, dict] = {}
    for top in TOP_SLICES_CANDIDATES:
        on_val = study_scores(val, top)
        threshold = decision_threshold(on_val.rename(columns={"probability": "score"}), config)
        row = {"val_auc": binary_metrics(on_val["label"], on_val["probability"])["auc"], "threshold": threshold}
        for source in trained:
            row[source] = {}
            for name, part in series.items():
                studies = study_scores(part[part["source"] == source], top)
                if studies.empty or studies["label"].nunique() < 2:
                    continue
                m = binary_metrics(studies["label"], studies["probability"], threshold)
                row[source][name] = {"series": len(studies)} | {key: m[key] for key in ("auc", "recall", "specificity")}
                print(
                    f"{top!s:>8} (val AUC {row['val_auc']:.3f}) {source:>14} {name:>11}: "
                    f"{len(studies):4d} series, AUC {m['auc']:.3f}, sensitivity {m['recall']:.3f}, specificity {m['specificity']:.3f}"
                )
        results[str(top)] = row
    record = {"sources": trained, "dilution": list(study.dilution), "aggregations": results}
    write_text_atomic(root / OUT, json.dumps(record, indent=2) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
