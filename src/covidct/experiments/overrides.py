"""Dotted-key params overrides (``crop.margin: 3``): applied and validated like params.yaml, and
written as the `dvc exp run -S` arguments that reproduce them in the full pipeline."""

from __future__ import annotations

import copy
import json
from typing import Any

from covidct.config import Params
from covidct.schema import set_dotted


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with dotted-key ``overrides`` applied, validated like params.yaml."""
    result = copy.deepcopy(params)
    set_dotted(result, overrides)
    Params.of(result)
    return result


def as_overrides(overrides: dict[str, Any]) -> str:
    """The `dvc exp run` arguments that put a lever into the full pipeline."""
    return " ".join(f"-S {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
