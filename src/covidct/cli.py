"""``covidct``: the command line over the library (the DVC stages live in ``pipelines/``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from covidct.config import ConfigError, Params, RegistryConfig, load_params
from covidct.profiles import apply_profile, available


def _sweep(args: argparse.Namespace, root: Path) -> None:
    from covidct.sweep.config import load_sweep
    from covidct.sweep.study import (
        apply_best,
        best_overrides,
        confirmed_arm,
        finished_trials,
        open_study,
        run_sweep,
        summarise,
    )

    config = load_sweep(args.config)
    if args.n_trials:
        config = config.replace(n_trials=args.n_trials)
    if getattr(args, "timeout_s", None):
        config = config.replace(timeout_s=args.timeout_s)
    if args.command == "sweep":
        study = run_sweep(root, config, args.storage, args.worker_index)
        out = summarise(root, config, study)
        print(f"study {config.study}: {finished_trials(study)} finished trials; plots and trials.csv in {out}")
        if any(t.state.name == "COMPLETE" for t in study.trials):
            print(
                f"best validation {config.objective} {study.best_value:.4f} (trial {study.best_trial.number}): {study.best_trial.params}"
            )
    elif args.command == "sweep-confirm":
        from covidct.sweep.confirm import confirm_segmenter, confirmation_levers, lever_plan, record_lever_confirmation

        study = open_study(root, config, args.storage, read_only=True)
        if config.trains == "segmenter":
            print(f"confirmation: {confirm_segmenter(root, config, study, args.seeds)}")
        elif not lever_plan(root, config).is_file():
            plan = confirmation_levers(root, config, study, args.seeds)
            print(f"lever study {plan}: run it with `covidct levers {plan.relative_to(root)}`, then this again")
        else:  # the plan is kept as it is (arms may have been added by hand): its results are recorded
            report = record_lever_confirmation(root, config, study)
            plan = lever_plan(root, config).relative_to(root)
            print(
                f"confirmation: {report}"
                if report
                else f"no arm of {plan} has run all its seeds: `covidct levers {plan}`"
            )
    else:
        study = open_study(root, config, args.storage, read_only=True)
        if args.apply:
            overrides = apply_best(root, study, config, args.arm)
        else:
            overrides = confirmed_arm(root, config, args.arm) if args.arm else best_overrides(study, config)
        for key, value in overrides.items():
            print(f"{key}: {value}")
        if args.apply:
            print("written to params.yaml; `dvc repro` (or `dvc exp run`) reproduces this trial's pipeline")


def _registry(root: Path) -> RegistryConfig:
    """The registry settings of params.yaml; the store is the project's (or MLFLOW_TRACKING_URI)."""
    from covidct.tracking import connect

    connect(root)
    return RegistryConfig.of(load_params(root / "params.yaml"))


DEFAULT_MODEL = "models:/covidct@champion"  # params.yaml's registry, for runs outside a checkout


def _model_uri(args: argparse.Namespace, root: Path) -> str:
    """``--model``, else the project's alias; outside a checkout (no params.yaml, say a folder of
    scans with MLFLOW_TRACKING_URI set) the alias every checkout ships with."""
    if args.model or not (root / "params.yaml").is_file():
        from covidct.tracking import connect

        connect(root)
        return args.model or DEFAULT_MODEL
    config = _registry(root)
    return f"models:/{config.model_name}@{config.alias}"


def _promote(args: argparse.Namespace, root: Path) -> None:
    from mlflow.tracking import MlflowClient

    from covidct.registry.promote import PromotionError, promote_if_better

    config = _registry(root)
    overrides = {
        "alias": args.alias,
        "select_metric": args.metric,
        "min_val_recall": args.min_val_recall,
        "min_heldout_auc": args.min_heldout_auc,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    try:
        decision = promote_if_better(
            MlflowClient(),
            args.model_name or config.model_name,
            alias=config.alias,
            metric=config.select_metric,
            min_val_recall=config.min_val_recall,
            version=args.version,
            variant=args.variant,
            min_heldout_auc=config.min_heldout_auc,
        )
    except PromotionError as exc:
        raise ConfigError(str(exc)) from exc
    verdict = "promoted" if decision.promoted else "not promoted"
    print(
        f"version {decision.candidate} {verdict}: {decision.reason}. @{config.alias} -> {decision.champion or 'none'}"
    )


def _predict(args: argparse.Namespace, root: Path) -> None:
    from covidct.gate import REFUSED
    from covidct.predict import (
        SCAN_KINDS,
        collect_scans,
        group_studies,
        load_pipeline,
        predict_files,
        studies_csv,
        write_overlays,
        write_predictions,
    )

    model = _model_uri(args, root)
    found, skipped = collect_scans(args.paths)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"{len(skipped)} files in the folders are not {SCAN_KINDS} and were skipped: {shown}")
    files, studies = group_studies(found)
    if not files:
        raise FileNotFoundError(f"no scans ({SCAN_KINDS}) under {', '.join(map(str, args.paths))}")
    pipeline = load_pipeline(model)
    predictions = predict_files(pipeline, files, args.batch_size)
    if args.adapt_batchnorm:
        try:
            predictions = pipeline.adapt_batchnorm(predictions)
        except ValueError as exc:
            print(f"error: --adapt-batchnorm: {exc}", file=sys.stderr)
            sys.exit(2)
        adapted = sum(p.classifier_input is not None for p in predictions)
        print(f"classifier BatchNorm statistics re-estimated on {adapted} of these scans, then they were scored again")
    table = write_predictions(
        predictions, args.out, studies, pipeline.study_top, pipeline.study_threshold, pipeline.outside_lungs
    )
    refused = int(table["error"].str.startswith(REFUSED).sum())
    failed = int((table["error"] != "").sum()) - refused
    print(
        f"{len(table) - failed - refused} scans scored, {failed} unreadable, {refused} refused by the input gate; {model} -> {args.out}"
    )
    if any(studies):
        print(
            f"{len(set(filter(None, studies)))} DICOM series scored as studies (each the mean of {pipeline.study_top.describe()}; "
            f"{int(table['outside_lungs'].fillna(False).sum())} slices outside the lungs left out) -> {studies_csv(args.out)}"
        )
    if args.overlays:
        print(f"{write_overlays(predictions, args.overlays)} overlays in {args.overlays}")


def _verify_model(args: argparse.Namespace, root: Path) -> None:
    from covidct.verify import compare_with_evaluate, external_recall, max_score_difference, score_split

    model = _model_uri(args, root)
    scored = score_split(model, root, args.split)
    comparison = compare_with_evaluate(scored, root, args.split)
    gap = max_score_difference(scored, root)
    print(comparison.to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    print(
        f"{len(scored)} {args.split} scans; largest probability difference from the classifier stage's predictions: {gap:.3g}"
    )
    if (comparison["difference"] != 0).any():
        print(f"error: {model} does not reproduce the evaluate stage's {args.split} metrics", file=sys.stderr)
        sys.exit(1)
    print(f"{model} reproduces the evaluate stage's {args.split} metrics exactly")
    if args.external:
        print("\nunseen scans (held-out lung-set patients, all COVID-19): share predicted COVID")
        print(external_recall(model, root).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _levers(args: argparse.Namespace, root: Path) -> None:
    from covidct.levers.plan import load_levers

    study, base = load_levers(args.config), load_params(root / "params.yaml")
    runs = study.checked_runs(base, args.only.split(",") if args.only else None, args.seeds)  # before heavy imports

    from covidct.levers.runner import run_levers
    from covidct.runtime import configure_threads, select_device

    configure_threads()
    report = run_levers(root, base, study, runs, select_device())
    print(f"lever table: {report} (and .csv, .png beside it)")


def _profile(args: argparse.Namespace, root: Path) -> None:
    if not args.name:
        print("\n".join(available(root)))
        return
    apply_profile(root, args.name)
    print(f"params.yaml now uses profile {args.name!r}; run `dvc repro` (or `dvc status` to see what changes)")


def _check_params(args: argparse.Namespace, root: Path) -> None:
    Params.of(load_params(root / "params.yaml"))
    print("params.yaml is valid")


def build_parser() -> argparse.ArgumentParser:
    """Each subcommand names the function that runs it (``run``)."""
    parser = argparse.ArgumentParser(prog="covidct", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    profile = sub.add_parser("profile", help="merge a profile from pipelines/profiles/ into params.yaml")
    profile.add_argument("name", nargs="?", help="profile name; omit to list them")
    profile.set_defaults(run=_profile)
    sub.add_parser("check-params", help="validate every section of params.yaml").set_defaults(run=_check_params)
    for name, help_text in (
        ("sweep", "run (or resume) an Optuna study over the pipeline"),
        ("sweep-best", "print the best trial's parameters"),
        ("sweep-confirm", "train the best trial against params.yaml over seeds, paired (before --apply)"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(run=_sweep)
        command.add_argument("config", help="sweep definition, e.g. pipelines/sweeps/cpu-smoke.yaml")
        command.add_argument(
            "--storage", help="Optuna storage URL (overrides the config's), e.g. postgresql+psycopg://host/db"
        )
        command.add_argument(
            "--n-trials", type=int, help="finished trials the study should hold (overrides the config's)"
        )
        if name == "sweep":
            command.add_argument(
                "--worker-index", type=int, default=0, help="distinct per concurrent worker (sampler seed offset)"
            )
            command.add_argument(
                "--timeout-s", type=float, help="start no trial after this many seconds (this session's share)"
            )
        elif name == "sweep-confirm":
            command.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds each arm trains with")
        else:
            command.add_argument("--apply", action="store_true", help="write them into params.yaml")
            command.add_argument(
                "--arm", help="an adopted arm of the study's confirmation instead (a part of the trial, say)"
            )
    promote = sub.add_parser(
        "promote", help="move the champion alias to a better registered pipeline (validation metric, recall floor)"
    )
    promote.set_defaults(run=_promote)
    promote.add_argument("--version", help="the candidate version (default: the best registered one)")
    promote.add_argument(
        "--variant",
        help="only pipelines with this classifier, e.g. efficientnet_b4; the alias then holds the best of them",
    )
    promote.add_argument("--model-name", help="registered model (default: registry.model_name in params.yaml)")
    promote.add_argument("--alias", help="default: registry.alias")
    promote.add_argument("--metric", help="validation metric to compare (default: registry.select_metric)")
    promote.add_argument(
        "--min-val-recall", type=float, help="recall floor on the validation split (default: registry.min_val_recall)"
    )
    promote.add_argument(
        "--min-heldout-auc",
        type=float,
        help="AUC floor on every source the classifier never trained on (default: registry.min_heldout_auc)",
    )
    predict = sub.add_parser(
        "predict", help="score CT scans (PNG, JPEG, DICOM; files or folders) with a registered pipeline"
    )
    predict.set_defaults(run=_predict)
    predict.add_argument("paths", nargs="+", type=Path)
    predict.add_argument(
        "--model",
        help=f"MLflow model URI (default: models:/<registry.model_name>@<registry.alias>; {DEFAULT_MODEL} outside a checkout)",
    )
    predict.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: predictions.csv)"
    )
    predict.add_argument(
        "--overlays", type=Path, help="folder for overlays (lung mask, lesion, crop box), one PNG per scan"
    )
    predict.add_argument("--batch-size", type=int, default=64, help="scans decoded and scored together")
    predict.add_argument(
        "--adapt-batchnorm",
        action="store_true",
        help="scans of one new site, at least 32: first re-estimate the classifier's BatchNorm statistics on them "
        "(unlabelled; each score then depends on the whole batch; docs/levers.md)",
    )
    verify = sub.add_parser(
        "verify-model", help="run a registered pipeline on a split's raw scans and compare with the evaluate stage"
    )
    verify.add_argument(
        "--model",
        help=f"MLflow model URI (default: models:/<registry.model_name>@<registry.alias>; {DEFAULT_MODEL} outside a checkout)",
    )
    verify.set_defaults(run=_verify_model)
    verify.add_argument("--split", choices=("val", "test"), default="test")
    verify.add_argument(
        "--external",
        action="store_true",
        help="also score the held-out lung-set patients (another source, all COVID-19)",
    )
    levers = sub.add_parser(
        "levers", help="train one classifier per recipe change on the last dvc repro's images; val/test table with CIs"
    )
    levers.set_defaults(run=_levers)
    levers.add_argument("config", help="lever study, e.g. pipelines/levers/cpu.yaml")
    levers.add_argument("--only", help="comma-separated lever names (default: all; finished ones are reused)")
    levers.add_argument("--seeds", type=int, nargs="+", help="a part of the study's seeds (default: all of them)")
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.run(args, Path.cwd())
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
