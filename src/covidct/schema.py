"""How a config file is read: frozen pydantic models that reject unknown keys and convert
nothing silently, and pydantic's errors turned into one line that names the file and the key
(``params.yaml: segmenter.tversky_alpha must be <= 1.0, got 1.5``).

What params.yaml holds is in :mod:`covidct.config`; sweeps and lever studies build on the same.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A missing, unknown or out-of-range key in params.yaml or another config file."""


class FieldError(ValueError):
    """A check across fields, raised by a model validator with the field it blames."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]


class Model(BaseModel):
    """Frozen (hashable, safe to share), unknown keys rejected, no silent type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, checked like the original (pydantic's model_copy checks nothing)."""
        return validated(type(self), self.model_dump() | changes, type(self).__name__)


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> tuple[list[str | int], str]:
    """Pydantic's error as (where, what) in params.yaml's words."""
    loc, kind, ctx, given = list(error["loc"]), error["type"], error.get("ctx") or {}, error.get("input")
    got = f", got {given!r}"
    if kind == "missing":
        return loc, "is missing"
    if kind == "extra_forbidden":
        return loc, f"is not a known key (known: {', '.join(_fields_at(model, loc[:-1]))})"
    if kind == "value_error":
        cause = ctx.get("error")
        return loc + ([cause.key] if isinstance(cause, FieldError) else []), f"{cause}"
    if kind == "literal_error":
        return loc, f"must be one of {ctx['expected'].replace(chr(39), '').replace(' or ', ', ')}{got}"
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
    if kind in bounds:
        return loc, f"must be {_range(model, loc) or f'{bounds[kind]} {next(iter(ctx.values())):g}'}{got}"
    if kind == "multiple_of":
        return loc, f"must be a multiple of {ctx['multiple_of']}{got}"
    if kind == "string_pattern_mismatch":
        return loc, f"must match {ctx['pattern']}{got}"
    if kind == "too_short":
        return loc, f"must list at least {ctx['min_length']}{got}"
    names = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
    }
    if kind in names:
        return loc, f"must be {names[kind]}{got}"
    if kind in ("tuple_type", "list_type"):
        return loc, f"must be a list{got}"
    if kind in ("model_type", "dict_type"):
        return loc, f"must be a mapping, got {type(given).__name__}"
    return loc, f"{error['msg'][0].lower()}{error['msg'][1:]}{got}"


def _range(model: type[BaseModel], loc: list[str | int]) -> str:
    """``in [0, 1]`` for a field bounded on both sides (``(`` where the bound is excluded), else ""."""
    *parents, name = loc
    for part in parents:
        field = model.model_fields.get(str(part))
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""
        model = inner
    field = model.model_fields.get(str(name))
    found = {type(m).__name__: m for m in (field.metadata if field is not None else [])}
    low = ("[", found["Ge"].ge) if "Ge" in found else ("(", found["Gt"].gt) if "Gt" in found else None
    high = ("]", found["Le"].le) if "Le" in found else (")", found["Lt"].lt) if "Lt" in found else None
    if low is None or high is None:
        return ""
    return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"


def _fields_at(model: type[BaseModel], loc: list[str | int]) -> list[str]:
    """The keys the model at ``loc`` knows (for "is not a known key")."""
    for part in loc:
        field = model.model_fields.get(str(part))
        inner = field.annotation if field is not None else None
        # a model, or a container of one (dict[str, SourceConfig]: the next part is a name)
        for kind in (inner, *getattr(inner, "__args__", ())):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
                break
    return list(model.model_fields)


def _dotted(loc: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def validated(model: type[M], raw: Any, where: str, prefix: str = "") -> M:
    """``model`` read from ``raw``, or one ConfigError: ``<where>: <key> <what is wrong>``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        loc, message = _describe(exc.errors()[0], model)
        key = ".".join(p for p in (prefix, _dotted(loc)) if p)
        raise ConfigError(f"{where}: {key} {message}".replace(":  ", ": ")) from None


def set_dotted(
    params: MutableMapping[str, Any], overrides: Mapping[str, Any], what: str = "override", new_keys: bool = False
) -> None:
    """Set dotted keys (``crop.margin: 3``) in place: the one way a profile, a sweep trial, a lever
    or ``sweep-best --apply`` changes params.yaml. A key must already exist (a typo is an error,
    not a new key that nothing reads) unless ``new_keys``, which tests use to hand the reader one."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node: Any = params
        for key in parents:
            node = node.get(key) if isinstance(node, Mapping) else None
        if not isinstance(node, MutableMapping) or (leaf not in node and not new_keys):
            raise ConfigError(f"{what} key {dotted} does not exist in params.yaml")
        node[leaf] = value


def dotted_keys(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{crop: {margin: 3}}`` as ``{"crop.margin": 3}`` (a list is one value)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and value:
            flat |= dotted_keys(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, or one ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys")
    return raw
