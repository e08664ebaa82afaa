"""Turn a plain nested dict (composed YAML) into typed dataclasses, once, at the entry point.

Every error names the full dotted key and says what would be valid, so a typo such as
`trainer.max_stepz` fails before any process group starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from mm_moe.errors import UserError


class ConfigError(UserError):
    """A user mistake in the configuration; the message names the key."""


def did_you_mean(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean '{match[0]}'?" if match else ""


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list and get_args(tp):
        return f"a list of {type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int, float or str; YAML gives `1e-3` as a string, so floats parse strings."""
    if tp is bool and isinstance(value, bool):
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int and is_number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if tp is float and is_number:
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and (isinstance(value, str) or is_number):
        return str(value)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{key}={value!r} is not valid; expected {expected[tp]}")


def _union(value: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} must not be null; expected {type_name(tp)}")
    candidates = [arg for arg in args if arg is not type(None)]
    if len(candidates) == 1:  # Optional[X]: X's own error says more (which item, what choices)
        return _convert(value, candidates[0], key)
    for arg in candidates:
        try:
            return _convert(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}={value!r} is not valid; expected {type_name(tp)}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin in (Union, types.UnionType):
        return _union(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()
        }
    if tp in (bool, int, float, str):
        return _scalar(value, tp, key)
    raise AssertionError(f"unsupported schema type {tp!r} at {key}")


def config_key(f: dataclasses.Field) -> str:
    """A field's key in YAML and on the command line: its name, or `metadata["key"]` where
    the key is a Python keyword (`checkpoint.async` is the field `async_save`)."""
    return f.metadata.get("key", f.name)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    fields = {config_key(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = unknown[0]
        full = f"{prefix}.{name}" if prefix else str(name)
        where = f"under '{prefix}'" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key '{full}'.{did_you_mean(str(name), list(fields))} "
            f"Valid keys {where}: {', '.join(sorted(fields))}"
        )
    required = [
        k
        for k, f in fields.items()
        if k not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        full = f"{prefix}.{required[0]}" if prefix else required[0]
        raise ConfigError(f"{full}=... is required (it has no default)")
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        field_name = fields[name].name
        kwargs[field_name] = _convert(value, hints[field_name], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"invalid config{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config dataclass (for saving and logging)."""
    if dataclasses.is_dataclass(obj):
        return {config_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def valid_keys(cls: type, path: list[str]) -> list[str] | None:
    """Field names at dotted `path` inside schema `cls`, or None when path leaves the schema
    (a free-form dict) so no key check applies there."""
    hints = typing.get_type_hints(cls)
    if not path:
        return [config_key(f) for f in dataclasses.fields(cls)]
    head, *rest = path
    head = next((f.name for f in dataclasses.fields(cls) if config_key(f) == head), head)
    if head not in hints:
        return []
    tp = hints[head]
    if get_origin(tp) in (Union, types.UnionType):
        tp = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
    if dataclasses.is_dataclass(tp):
        return valid_keys(tp, rest)
    return None
