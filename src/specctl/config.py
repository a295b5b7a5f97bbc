"""Config fails loudly: dataclasses, resolved from defaults <- YAML file <- `--set a.b=c` overrides.

Unknown keys are rejected with their dotted path; values are coerced to the field's type
(so `--set train.lr=3e-4` works from a shell). `save_config` writes the resolved config
beside every checkpoint and output so a run can be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from specctl.errors import ConfigError, UsageError

T = TypeVar("T")


def resolve(
    cls: type[T],
    yaml_path: Path | str | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> T:
    """Build `cls` from defaults, then a YAML file, then `--set` overrides, then explicit flags.

    `flags` are dotted keys too (use `__` for dots: `train__lr=1e-3`); `None` values are skipped
    so unset CLI flags leave the config alone.
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        data = _load_yaml(Path(yaml_path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}", "use --set key.sub=value")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), _parse_scalar(value))
    for key, value in flags.items():
        if value is not None:
            _set_dotted(data, key.replace("__", "."), value)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {path!r}", f"known keys here: {known}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except UsageError as e:  # a dataclass's own range check: keep its message
        raise ConfigError(e.message, e.hint) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config {prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: Path | str) -> None:
    """Resolved config as JSON (stable keys) beside a checkpoint or output."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_dict(obj), indent=2, sort_keys=True, default=str) + "\n")


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last: ConfigError | None = None
        for arg in non_none:
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{path}.")  # type: ignore[arg-type]
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def parse_size(text: str | int) -> int:
    """'4GiB', '512MiB', '1.5GB', '1G', '1000' -> a positive byte count."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "b": 1,
        "k": 1 << 10,
        "kb": 10**3,
        "kib": 1 << 10,
        "m": 1 << 20,
        "mb": 10**6,
        "mib": 1 << 20,
        "g": 1 << 30,
        "gb": 10**9,
        "gib": 1 << 30,
        "t": 1 << 40,
        "tb": 10**12,
        "tib": 1 << 40,
    }
    s = text.strip().lower().replace(" ", "").replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise ConfigError(f"bad size {text!r}", hint="e.g. 4GiB, 512MiB or a byte count") from None
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return value
