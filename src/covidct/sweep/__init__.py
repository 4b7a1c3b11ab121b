"""Optuna sweeps over the whole two-stage pipeline, with reuse of trained stages, pruning,
resumable RDB storage and MLflow parent/trial runs."""
