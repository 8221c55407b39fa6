"""The one YAML -> dataclass loader behind every command's config (train, synth, the demos).

- Files may include others: ``defaults: [base.yaml, ...]`` (paths relative to the file), merged underneath.
- Overrides ``key.sub=value`` (list items by index: ``phases.1.epochs=2``) are parsed like file values.
- Values follow YAML 1.2's core schema where YAML 1.1 surprises: numbers are read as Python writes them
  (``1e-5`` is a float, not the string YAML 1.1 makes of it) and only ``true`` / ``false`` are booleans
  (``mixed_precision: no`` stays the word "no").
- Dataclasses are built recursively against their type hints; unknown keys, wrong types and the checks a
  dataclass makes in ``__post_init__`` (by raising :class:`FieldError`) are :class:`ConfigError` naming the file,
  the dotted key and, when it came from the command line, the override.
- A section given in part is merged over the field's default (a dataclass default made by ``default_factory``
  keeps the values the factory set).

Depends on nothing in mmpref but :mod:`mmpref.errors`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmpref.errors import ConfigError

T = TypeVar("T")

__all__ = ["ConfigError", "FieldError", "Loaded", "apply_overrides", "build", "check", "dump_yaml", "load",
           "parse_value", "read_yaml", "set_dotted"]


# ----- YAML with Python's numbers and YAML 1.2's booleans ------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_FLOAT = re.compile(r"""^[-+]?(?:
    [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.  1.5  1.5e-3
  | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5  .5e3
  | [0-9][0-9_]*[eE][-+]?[0-9]+                 # 1e-5 (YAML 1.1 needs a dot here)
  | \.(?:inf|Inf|INF)
)$|^\.(?:nan|NaN|NAN)$""", re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text.endswith(".nan") else float(text)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_value(text: str) -> Any:
    """A value as a config file would read it (``1e-5`` -> 0.00001, ``no`` -> "no", ``[1, 2]`` -> a list)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket): the type check reports it as the string it is


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


# ----- files, includes, overrides -----------------------------------------------------------------------------------
RECIPES = Path(__file__).resolve().parent / "recipes"  # the packaged configs (a checkout's configs/ points here)


def resolve_config(arg: str | os.PathLike) -> Path:
    """``arg`` if it exists; else the packaged recipe it names: ``llm_dpo``, ``llm_dpo.yaml`` or
    ``configs/llm_dpo.yaml`` (so the README's commands also work from a ``pip install``, outside a checkout)."""
    path = Path(os.path.expanduser(str(arg)))
    if path.exists() or path.parent not in (Path("."), Path("configs")):
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    return RECIPES / name if (RECIPES / name).is_file() else path


def recipes() -> dict[str, str]:
    """Packaged recipe name -> its first comment line."""
    out = {}
    for f in sorted(RECIPES.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        out[f.stem] = first
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """One file, with its ``defaults:`` bases (paths relative to it) merged underneath, later entries winning."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular `defaults:` include")
    if not path.is_file():
        what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config {path} {what}; give the path of a YAML config or the name of a packaged recipe "
                          "(`mmpref recipes` lists them)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', None) or e})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    bases = raw.pop("defaults", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / base, (*_seen, path.resolve())))
    return _merge(merged, raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(raw: dict, overrides: Sequence[str], source: str, must_exist: bool = False) -> dict[str, str]:
    """Apply ``key.sub=value`` items to ``raw`` in place; returns {dotted key: override} for error messages.

    ``must_exist``: the key must already be in ``raw`` (configs that are plain dicts, without a schema to check).
    """
    overridden: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        set_dotted(raw, key, parse_value(text), source, must_exist, label=f"override {item!r}")
        overridden[key] = item
    return overridden


def set_dotted(raw: dict, key: str, value: Any, source: str, must_exist: bool = False, label: str = "") -> None:
    """``raw[k1][k2]... = value`` for ``key = "k1.k2..."`` (list items by index); errors name ``source``."""
    try:
        _set_dotted(raw, key.split("."), value, must_exist)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {label or key}: {e.args[0] if e.args else e}") from None


def _set_dotted(raw: Any, keys: list[str], value: Any, must_exist: bool) -> None:
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(raw, list):
            if not k.lstrip("-").isdigit():
                raise KeyError(f"{'.'.join(keys[:i]) or 'the top level'} is a list: address its items by number")
            j = int(k)
            if not -len(raw) <= j < len(raw):
                raise IndexError(f"{'.'.join(keys[:i + 1])}: the list has {len(raw)} item(s)")
            if last:
                raw[j] = value
            else:
                raw = raw[j]
            continue
        if not isinstance(raw, dict):
            raise TypeError(f"{'.'.join(keys[:i])} is not a mapping")
        if must_exist and k not in raw:
            raise KeyError(f"{'.'.join(keys[:i + 1])} names no existing key")
        if last:
            raw[k] = value
        else:
            if raw.get(k) is None:
                raw[k] = {}
            raw = raw[k]


# ----- typing -------------------------------------------------------------------------------------------------------
class FieldError(ValueError):
    """Raised by a dataclass's ``__post_init__`` for one of its fields; the loader prefixes the section's key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check(ok: Any, field: str, message: str) -> None:
    """``__post_init__`` helper: raise :class:`FieldError` unless ``ok``."""
    if not ok:
        raise FieldError(field, message)


class _KeyError(Exception):
    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


def build(tp: Any, value: Any, source: str = "<dict>", overridden: Mapping[str, str] | None = None,
          key: str = "", hints: Mapping[str, Any] | None = None, default: Any = None) -> Any:
    """``value`` (plain YAML data) typed as ``tp``; errors are :class:`ConfigError` naming ``source`` and the key.
    A ``default`` instance of ``tp`` fills the keys a partial mapping leaves out."""
    try:
        return _build(tp, value, key, hints, default)
    except _KeyError as e:
        raise ConfigError(f"{where(source, e.key, overridden)}: {e.msg}") from None


def where(source: str, key: str, overridden: Mapping[str, str] | None = None) -> str:
    """``FILE: KEY (from override 'KEY=...')``: how every config error starts."""
    hits = [item for k, item in (overridden or {}).items() if key == k or key.startswith(k + ".")]
    return f"{source}: {key or '<top>'}" + (f" (from override {hits[-1]!r})" if hits else "")


class Loaded(typing.NamedTuple):
    raw: dict
    overridden: dict[str, str]


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Loaded:
    """A config file with its includes and overrides applied, untyped (see :func:`build`)."""
    path = resolve_config(path)
    raw = read_yaml(path)
    return Loaded(raw, apply_overrides(raw, overrides, str(path)))


def _build(tp: Any, value: Any, key: str, hints: Mapping[str, Any] | None = None, default: Any = None) -> Any:
    label = key or "<top>"
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _build(a, value, key, default=default)
            except _KeyError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise _KeyError(label, f"expected {_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, hints, default)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _KeyError(label, f"expected a list, got {value!r}")
        return [_build(args[0] if args else Any, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _KeyError(label, f"expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _build(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise _KeyError(label, f"expected {tp.__name__}, got {value!r}")
    return value


def _build_dataclass(tp: type, value: Any, key: str, hints: Mapping[str, Any] | None, default: Any) -> Any:
    label = key or "<top>"
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise _KeyError(label, f"expected a mapping ({tp.__name__}), got {value!r}")
    hints = hints or typing.get_type_hints(tp)
    known = {f.name: f for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise _KeyError(_join(key, unknown[0]), f"unknown key; {tp.__name__} accepts {sorted(known)}")
    base = default if isinstance(default, tp) else None
    kwargs = {}
    for name, v in value.items():
        inner_default = getattr(base, name) if base is not None else _field_default(known[name])
        kwargs[name] = _build(hints[name], v, _join(key, name), default=inner_default)
    if base is not None:  # a partial section keeps the rest of its default instance
        kwargs = {**{f: getattr(base, f) for f in known if f not in kwargs and known[f].init}, **kwargs}
    missing = [f.name for f in known.values() if f.name not in kwargs and _required(f)]
    if missing:
        raise _KeyError(_join(key, missing[0]), "required")
    try:
        return tp(**kwargs)
    except FieldError as e:
        raise _KeyError(_join(key, e.field), e.message) from None
    except (ValueError, TypeError) as e:  # a check written without FieldError: its message names what is wrong
        raise _KeyError(label, str(e)) from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
