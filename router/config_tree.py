"""Frozen config dataclasses to and from YAML-shaped data (`RouterConfig`, `ControlPlaneConfig`).

One generic walk over dataclass fields, so a field added to any config in the tree is settable from a file,
the environment and the Helm chart without another line of parsing code. Errors are `ValueError`s that start
with the dotted key path (`router.admission.headroom: ...`) and, for an unknown key, list the known ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """`cls`'s field annotations, resolved (the configs use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: Any, path: str, *, moved: Mapping[str, str] | None = None) -> T:
    """Build `cls` from `data`, nested configs included; fields `data` leaves out keep their defaults.

    `moved` maps keys that used to exist to their new dotted path, so an old file fails with a pointer.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{path or 'config'}: must be a mapping, got {type(data).__name__}")
    types_ = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = join(path, str(key))
        if moved and key in moved:
            raise ValueError(f"{key_path}: this key moved; write it as {join(path, moved[key])}")
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            guess = f"did you mean {hint[0]!r}? " if hint else ""
            raise ValueError(f"{key_path}: unknown key; {guess}known: {', '.join(names)}")
        kwargs[key] = _value(types_[key], value, key_path)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(_rooted(path, names, str(exc))) from None


def _rooted(path: str, names: list[str], message: str) -> str:
    """A constructor's message (`headroom must be ...`) rooted at the key it names, when it names one."""
    if not path:
        return message
    first = message.split(" ", 1)[0]
    if first.endswith(":") and first[:-1] in names:  # `name: reason`, already keyed
        return f"{join(path, first[:-1])}: {message.split(' ', 1)[1]}"
    return f"{join(path, first)}: {message}" if first in names else f"{path}: {message}"


def _value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (tp,) = [o for o in options if o is not type(None)] or [tp]
        return _value(tp, value, path)
    if is_config(tp):
        # An empty YAML section (`router:` with nothing under it) means the section's defaults.
        return value if isinstance(value, tp) else from_dict(tp, {} if value is None else value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{path}: must be one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}: must be a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    return _scalar(tp, value, path)


def _scalar(tp: Any, value: Any, path: str) -> Any:
    # bool is an int subclass, but `port: true` in YAML is a typo, not port 1.
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{path}: must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{path}: must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{path}: must be a string, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """`config` as YAML-shaped data (nested mappings, lists), which `from_dict` turns back into an equal config."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def parse_text(tp: Any, text: str, name: str) -> Any:
    """An environment variable's text as a value of the field type `tp` (scalars only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        tp = options[0] if len(options) == 1 else str
    try:
        if tp is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        if tp is int:
            return int(text)
        if tp is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}[tp]
        raise ValueError(f"{name}={text!r} is not {kind}") from None
    return text


def leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every scalar field of the tree under `cls`, as (key path, type); tuples (set in files only) are left out."""
    leaves = []
    hints = field_types(cls)
    for name, tp in ((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init):
        inner = _unwrap_optional(tp)
        if is_config(inner):
            leaves.extend(leaf_fields(inner, (*prefix, name)))
        elif typing.get_origin(inner) is not tuple:
            leaves.append(((*prefix, name), tp))
    return leaves


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, merging nested mappings key by key (a file's `router: {policy: x}` keeps the env's port)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def json_schema(cls: type, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A JSON schema of the tree under `cls` (types, enums, nesting; unknown keys refused), e.g. for a Helm chart's
    `values.schema.json`; `exclude` leaves top-level keys out (set by the chart itself)."""
    hints = field_types(cls)
    properties = {f.name: _schema(hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        inner = _schema(options[0]) if len(options) == 1 else {}
        return {"anyOf": [inner, {"type": "null"}]}
    if is_config(tp):
        return json_schema(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is tuple:
        args = typing.get_args(tp)
        return {"type": "array", "items": _schema(args[0]) if args else {}}
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp)
    return {"type": kind} if kind else {}
