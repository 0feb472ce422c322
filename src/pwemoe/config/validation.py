"""Validating a mapping into a Config, with pydantic's errors in pwemoe's words: every problem at once, each with
its key path, the values allowed and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import KEY_ERROR, KEYS_ERROR, ConfigError
from .overrides import apply_overrides
from .safe_yaml import load_yaml, read_yaml
from .schema import Config, Registries, submodel
from .task_types import config_model

_EXPECTED = {
    "float_type": "float",
    "int_type": "int",
    "string_type": "str",
    "bool_type": "bool",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _number_hint(typ: str, inp: Any) -> str:
    """How to write the value that was probably meant: a number where text is expected (`name: 1e3` reads as a
    float), a whole float where an int is expected (`steps: 1e3`), or a quoted number where a number is."""
    if typ == "string_type" and isinstance(inp, (int, float)) and not isinstance(inp, bool):
        return " (YAML reads it as a number; quote it to give text)"
    if typ == "int_type" and isinstance(inp, float) and inp.is_integer():
        return f" (write the integer {int(inp)})"
    if typ in ("float_type", "int_type") and isinstance(inp, str):
        try:
            value = load_yaml(inp, "value")
        except ConfigError:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return " (quoted, a number is text; write it without quotes)"
    return ""


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _walk(loc: tuple, registries: Registries | None) -> tuple[tuple, Any, Any]:
    """(loc without union tags, the model class reached, the last field) by walking the field annotations
    from Config; a task entry's tag (its type) switches to that type's config model."""
    cls: Any = Config
    f = None
    out: list[Any] = []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        if isinstance(part, int):
            if out[:-1] == ["tasks"] and parts and registries is not None and parts[0] in registries.task_configs:
                cls = registries.task_configs[parts.pop(0)]  # the union member's tag: not a key of the config
            continue
        if cls is None:
            f = None
            continue
        f = cls.model_fields.get(part)
        cls = submodel(f.annotation) if f is not None else None
    return tuple(out), cls, f


def _allowed_at(loc: tuple, registries: Registries | None) -> tuple[tuple, list[str]]:
    """(loc without union tags, the keys allowed in the mapping that holds the last key of `loc`)."""
    clean, cls, _ = _walk(loc[:-1], registries)
    return clean + loc[-1:], sorted(cls.model_fields) if cls is not None else []


def _message(err: Mapping[str, Any], registries: Registries | None = None) -> str:
    loc, typ, inp = tuple(err["loc"]), err["type"], err.get("input")
    if typ in ("union_tag_invalid", "union_tag_not_found"):
        known = sorted(registries.task_configs) if registries is not None else []
        got = err.get("ctx", {}).get("tag", inp.get("type") if isinstance(inp, dict) else inp)
        return f"{_path(loc + ('type',))}: unknown task type {got!r}; known: {known}"
    if typ == "extra_forbidden":
        loc, allowed = _allowed_at(loc, registries)
        key = loc[-1]
        types = registries.task_configs if registries is not None else {}
        owners = [t for t, c in types.items() if key in c.model_fields]
        if owners and len(loc) == 3 and loc[0] == "tasks":
            return (
                f"{_path(loc)}: an option of {', '.join(owners)} tasks, not of this task's type; "
                f"allowed keys are {allowed}"
            )
        return f"{_path(loc)}: unknown key; allowed keys are {allowed}"
    loc, _, f = _walk(loc, registries)
    if typ == "missing":
        return f"{_path(loc)}: required" + (f" ({f.description})" if f is not None and f.description else "")
    if typ in _EXPECTED:
        return f"{_path(loc)}: expected {_EXPECTED[typ]}, got {type(inp).__name__} {inp!r}" + _number_hint(typ, inp)
    if typ == KEY_ERROR:
        return f"{_path(loc + (err['ctx']['key'],))}: {err['ctx']['why']}"
    if typ == KEYS_ERROR:  # several errors found by one validator, each with its key
        return err["ctx"]["why"]
    if typ == "value_error":
        return f"{_path(loc)}: {str(err['msg']).removeprefix('Value error, ')}"
    return f"{_path(loc)}: {err['msg'].lower()}, got {inp!r}"


def config_from_dict(data: Any, registries: Registries | None = None) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping, got {type(data).__name__} {data!r}"])
    try:
        return config_model(registries).model_validate(data, context={"registries": registries})
    except ValidationError as e:
        lines = (line for x in e.errors() for line in _message(x, registries).split("\n"))
        raise ConfigError(list(dict.fromkeys(lines))) from None


def load_config(path: str | Path, overrides: list[str] | None = None, registries: Registries | None = None) -> Config:
    return config_from_dict(apply_overrides(read_yaml(path), overrides or []), registries)
