"""Gated promotion with registry aliases (MLflow deprecated stages): a candidate takes the
champion alias only when it clears the validation-recall floor and beats the champion on the
validation metric. Every decision and its reason is recorded as tags on the candidate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

VARIANT_TAG = "covidct.variant"


class PromotionError(ValueError):
    """No version to consider, or a version lacks the metrics a decision needs."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    candidate: str  # version number
    champion: str | None  # the version holding the alias afterwards
    reason: str


def val_metric(version: ModelVersion, metric: str) -> float:
    try:
        return float(version.tags[f"val.{metric}"])
    except (KeyError, ValueError) as exc:
        raise PromotionError(
            f"model version {version.version} has no validation {metric} tag (val.{metric}); was it registered by `dvc repro`?"
        ) from exc


def heldout_shortfall(version: ModelVersion, floor: float) -> str | None:
    """Why ``version`` fails the source-held-out floor, or None when it holds. Its figures: the
    worst leave-one-source-out fold of its recipe (``holdout.*`` tags, from the study of the same
    classifier settings) and its AUC on any source its own classifier never trained on
    (``source.*`` tags, from the evaluate_sources stage)."""
    if floor <= 0:
        return None
    held_out = [
        k[len("source.") : -len(".held_out")]
        for k, v in version.tags.items()
        if k.startswith("source.") and k.endswith(".held_out") and v == "1"
    ]
    aucs = {
        f"{name} (held out by this version)": float(version.tags[f"source.{name}.auc"])
        for name in held_out
        if f"source.{name}.auc" in version.tags
    }
    if "holdout.worst_auc" in version.tags:
        fold = version.tags["holdout.worst_fold"]
        aucs[f"{fold} (its recipe's worst leave-one-source-out fold, study {version.tags['holdout.study']})"] = float(
            version.tags["holdout.worst_auc"]
        )
    if not aucs:
        return (
            f"version {version.version} has no source-held-out AUC: no leave-one-source-out study of its recipe "
            "(holdout.* tags; `covidct levers pipelines/levers/holdout.yaml`, then `dvc repro register_model`) "
            "and no source its classifier never trained on (source.<name>.auc tags)"
        )
    name, auc = min(aucs.items(), key=lambda item: item[1])
    return f"source-held-out AUC on {name} {auc:.4f} is below the floor {floor:g}" if auc < floor else None


def current_champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def pick_candidate(
    client: MlflowClient, name: str, metric: str, min_val_recall: float, variant: str | None
) -> ModelVersion:
    """The best version on the validation metric among those clearing the recall floor
    (newest on a tie); when none clears it, the best one anyway, to be refused with a reason."""
    versions = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if variant is None or v.tags.get(VARIANT_TAG) == variant
    ]
    if not versions:
        raise PromotionError(
            f"no version of registered model {name!r}"
            + (f" with variant {variant!r}" if variant else "")
            + " (run `dvc repro` first)"
        )
    return max(
        versions, key=lambda v: (val_metric(v, "recall") >= min_val_recall, val_metric(v, metric), int(v.version))
    )


def promote_if_better(
    client: MlflowClient,
    name: str,
    *,
    alias: str = "champion",
    metric: str = "auc",
    min_val_recall: float = 0.9,
    version: str | None = None,
    variant: str | None = None,
    min_heldout_auc: float = 0.0,
) -> Decision:
    """Decide on ``version`` (default: the best registered one, of ``variant`` if given) against
    the version under ``alias``, move the alias if it wins, and tag the candidate with the outcome.
    ``min_heldout_auc`` > 0 also holds back a candidate whose AUC on any source its classifier
    never trained on is below it; the reason names that source.

    With ``variant``, a champion of another variant does not count: the alias then holds the
    best pipeline of that variant (e.g. "the best B4 pipeline").
    """
    candidate = (
        client.get_model_version(name, version)
        if version
        else pick_candidate(client, name, metric, min_val_recall, variant)
    )
    if variant is not None and candidate.tags.get(VARIANT_TAG) != variant:
        raise PromotionError(
            f"model version {candidate.version} is {candidate.tags.get(VARIANT_TAG)!r}, not {variant!r}"
        )
    champion = current_champion(client, name, alias)
    number, held = str(candidate.version), str(champion.version) if champion is not None else None
    score, recall = val_metric(candidate, metric), val_metric(candidate, "recall")
    if held == number:
        promoted, reason = False, f"version {number} already holds @{alias}"
    elif recall < min_val_recall:
        promoted, reason = False, f"validation recall {recall:.4f} is below the floor {min_val_recall:g}"
    elif shortfall := heldout_shortfall(candidate, min_heldout_auc):
        promoted, reason = False, shortfall
    elif champion is None:
        promoted, reason = True, f"no version held @{alias}; validation {metric} {score:.4f}, recall {recall:.4f}"
    elif variant is not None and champion.tags.get(VARIANT_TAG) != variant:
        promoted, reason = (
            True,
            f"@{alias} was version {champion.version} ({champion.tags.get(VARIANT_TAG)}), not {variant}; validation {metric} {score:.4f}",
        )
    else:
        incumbent = val_metric(champion, metric)
        # A tie goes to the newer registration: the same figures with newer code (a pipeline
        # re-registered with a lesion segmenter beside the same classifier) should serve.
        tie = score == incumbent and int(number) > int(champion.version)
        promoted = score > incumbent or tie
        comparison = "ties, and is newer than," if tie else "beats" if promoted else "does not beat"
        reason = f"validation {metric} {score:.4f} {comparison} version {champion.version}'s {incumbent:.4f}"
    if promoted:
        client.set_registered_model_alias(name, alias, number)
        if held is not None:
            client.set_model_version_tag(name, held, "promotion.replaced_by", number)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        "decision": "promoted" if promoted else "kept",
        "reason": reason,
        "alias": alias,
        "metric": metric,
        "min_val_recall": f"{min_val_recall:g}",
        "min_heldout_auc": f"{min_heldout_auc:g}",
        "time": stamp,
    }
    tags["compared_with"] = held or "none"
    for key, value in tags.items():
        client.set_model_version_tag(name, number, f"promotion.{key}", value)
    return Decision(promoted, number, number if promoted else held, reason)
