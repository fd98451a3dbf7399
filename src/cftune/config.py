"""Typed stage configs shared by the CLI and YAML files.

Each stage has one dataclass whose fields carry the defaults and help strings; CLI flags and YAML
keys are both derived from it, so a setting has exactly one name everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cftune.errors import CftuneError, did_you_mean

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help string (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _coerce(cls: type, name: str, tp: Any, value: Any, where: str) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise CftuneError(f"{where}: `{name}` may not be empty")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan/inf pass every `< 0` check below them
                raise CftuneError(f"{where}: `{name}` = {value!r} is not a finite number")
            return number
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(inner) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(cls, name, item, v, where) for v in items]
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise CftuneError(
            f"{where}: `{name}` = {value!r} is not a valid {getattr(inner, '__name__', inner)}"
        ) from None
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a mapping, rejecting unknown keys and wrong types with one clear line."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise CftuneError(
            f"{where}: unknown key(s) {', '.join(unknown)}{did_you_mean(unknown[0], known)} "
            f"(allowed: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(cls, k, hints[k], v, where) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except CftuneError as e:  # the settings' own checks: say which file they came from
        if where in ("arguments", "config") or str(e).startswith(where):
            raise
        raise CftuneError(f"{where}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise CftuneError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise CftuneError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise CftuneError(f"{path}: expected a mapping of settings at the top level")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple = ()) -> None:
    """Add one `--flag` per dataclass field; defaults stay None so YAML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        if inner is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        elif typing.get_origin(inner) is list:
            parser.add_argument(flag, dest=f.name, default=None, action="append",
                                help=help_ + " (repeat or comma-separate)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Merge `--config FILE` (if any) with the flags given; flags win."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_yaml(config_path))
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if isinstance(v, list):  # repeated/comma-separated list flags
            v = [item for chunk in v for item in str(chunk).split(",") if item != ""]
        values[f.name] = v
    return from_dict(cls, values, where=str(config_path) if config_path else "arguments")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON view of a config dataclass (for manifests)."""
    return dataclasses.asdict(config)
