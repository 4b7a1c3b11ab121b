"""Named parameter profiles (``pipelines/profiles/*.yaml``) merged into params.yaml.

A profile holds only the keys it changes; merging with ruamel keeps params.yaml's comments,
so ``git diff params.yaml`` shows exactly what a profile did, and DVC re-runs only the stages
whose keys changed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from covidct.atomic import write_text_atomic
from covidct.config import Params
from covidct.schema import ConfigError, dotted_keys, set_dotted

PROFILES = Path("pipelines/profiles")


def available(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PROFILES).glob("*.yaml"))


def apply_profile(root: Path, name: str, params_file: str = "params.yaml") -> dict[str, Any]:
    """Merge profile ``name`` into ``params_file``; validate the result before writing it."""
    profile = root / PROFILES / f"{name}.yaml"
    if not profile.is_file():
        raise ConfigError(f"{profile}: no such profile (available: {', '.join(available(root))})")
    nested = YAML(typ="safe").load(profile.read_text(encoding="utf-8")) or {}
    return set_params(root, dotted_keys(nested), params_file, what="profile")


def set_params(
    root: Path, overrides: Mapping[str, Any], params_file: str = "params.yaml", what: str = "override"
) -> Any:
    """Set dotted keys (``crop.margin``) in ``params_file``, keeping its comments; nothing is
    written unless the result validates."""
    yaml = YAML()
    yaml.preserve_quotes, yaml.width = True, 4096  # a file read by people: as it was written, but for the keys set
    yaml.indent(mapping=2, sequence=4, offset=2)
    params = yaml.load((root / params_file).read_text(encoding="utf-8"))
    set_dotted(params, {key: _flow(value) for key, value in overrides.items()}, what)
    Params.of(YAML(typ="safe").load(_dump(yaml, params)))
    write_text_atomic(root / params_file, _dump(yaml, params))
    return params


def _flow(value: Any) -> Any:
    """A list set from the command line or a sweep stays on its key's line, like the file's own."""
    if not isinstance(value, list | tuple):
        return value
    seq = CommentedSeq(_flow(v) for v in value)
    seq.fa.set_flow_style()
    return seq


def _dump(yaml: YAML, data: Any) -> str:
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    return buffer.getvalue()
