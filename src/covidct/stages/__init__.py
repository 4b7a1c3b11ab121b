"""One module per DVC stage: read params, call the library, write outputs, log to MLflow.

``pipelines/*.py`` are the thin entry points ``dvc.yaml`` calls; they only call ``main``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covidct.config import ConfigError, load_params
from covidct.datasets import DatasetError
from covidct.images import ImageReadError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not call out to PyPI

USER_ERRORS = (ConfigError, DatasetError, ImageReadError, FileNotFoundError)


def main(run: Callable[[dict[str, Any], Path], None], params_file: str = "params.yaml") -> None:
    """Run a stage in the current directory (the repo root under DVC); a bad input or
    parameter ends it with one line naming the file or key and exit status 2, not a traceback."""
    root = Path.cwd()
    try:
        run(load_params(root / params_file), root)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
