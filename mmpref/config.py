"""Typed run configuration: dataclasses loaded from YAML (``configs/*.yaml``) with ``key=value`` overrides.

The ``model:`` and ``data:`` sections are typed by the adapter named in ``modality`` (its ``model_config_class``
and ``data_config_class``). Unknown keys and bad values are errors that name the dotted key.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ReferenceConfig:
    """Where reference scores come from.

    mode: ``copy`` (a separate frozen model), ``lora`` (the policy with its LoRA adapter disabled: one copy of the
    weights), ``cached`` (precomputed once over the dataset, stored on disk), ``none`` (reference-free losses).
    """

    mode: str = "copy"
    dtype: str | None = None  # e.g. "bfloat16" for a lighter frozen copy; None keeps the policy's dtype
    path: str | None = None  # a different reference checkpoint; None means the policy's starting weights
    cache_dir: str | None = None  # for mode=cached; default <output_dir>/reference_cache


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the adapter's sensible default


@dataclass
class PhaseConfig:
    """One stage of a multi-stage recipe (e.g. an SFT epoch on winners, then DPO)."""

    name: str
    loss: Any  # a loss spec, see mmpref.losses.build_loss
    epochs: float | None = None
    max_steps: int | None = None


@dataclass
class OptimConfig:
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: str = "linear"  # linear | cosine | constant (all with linear warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    batch_size: int = 4  # per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    save_every: int = 500  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    eval_every: int | None = None
    num_workers: int = 0
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    cpu: bool = False  # force CPU (tests, CPU-only multi-process runs)


@dataclass
class TrainConfig:
    modality: str
    model: Any  # adapter.model_config_class instance
    data: Any  # adapter.data_config_class instance
    loss: Any = None  # single objective; or use phases
    phases: list[PhaseConfig] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


# ----- loading ------------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A bad configuration; the message names the file and the dotted key."""


def check_source(value: str, key: str, what: str) -> None:
    """Fail early, naming ``key``, when ``value`` is meant as a local path but does not exist.

    A value is a hub id only if it looks like one (``name`` or ``org/name``); anything else (absolute, ``./``,
    ``~``, or with more than one ``/``) is a local path. Without this, a typo reaches the hub client and comes back
    as an unrelated "Repo id must be in the form ..." error.
    """
    local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.path.exists(value)
    if local and not os.path.exists(os.path.expanduser(value)):
        raise FileNotFoundError(f"{key}: {value!r} does not exist; expected {what}. Set it with {key}=PATH")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML, optionally with ``defaults: [base.yaml, ...]``), apply ``key.sub=value`` overrides, type it.

    Override values are parsed with ``yaml.safe_load`` (``train.lr=1e-5``, ``loss={dpo: {beta: 0.2}}``); list items
    are addressed by index (``phases.1.epochs=2``).
    """
    raw = _read_yaml(Path(path), seen=())
    overridden: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key = key.strip()
        try:
            _set_dotted(raw, key.split("."), _parse_override_value(text))
        except (KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        overridden[key] = item
    return config_from_dict(raw, source=str(path), overridden=overridden)


# YAML 1.1 reads these as booleans; on a command line they are words (train.mixed_precision=no means "no")
_YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _parse_override_value(text: str) -> Any:
    """An override's value as YAML, except that only ``true``/``false`` are booleans (YAML 1.2)."""
    if text.strip().lower() in _YAML11_BOOL_WORDS:
        return text.strip()
    return yaml.safe_load(text)


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>", overridden: Mapping[str, str] = ()) -> TrainConfig:
    """Type a plain dict (as read from YAML) into a :class:`TrainConfig`; errors name ``source`` and the key."""

    def where(key: str) -> str:
        hits = [item for k, item in dict(overridden).items() if key == k or key.startswith(k + ".")]
        return f"{source}: {key}" + (f" (from override {hits[-1]!r})" if hits else "")

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    modality = raw.get("modality")
    if not isinstance(modality, str):
        raise ConfigError(f"{where('modality')}: required, a string naming the adapter (e.g. llm, diffusion)")
    from mmpref.adapters import get_adapter_class  # lazy: adapters import the loss core

    try:
        adapter = get_adapter_class(modality)
    except (KeyError, ImportError) as e:
        raise ConfigError(f"{where('modality')}: {e}") from None
    hints = {**_hints(TrainConfig), "model": adapter.model_config_class, "data": adapter.data_config_class}
    try:
        cfg = _build(TrainConfig, raw, "", hints)
    except _KeyError as e:
        raise ConfigError(f"{where(e.key)}: {e.msg}") from None
    _check_objective(cfg, where)
    return cfg


def _check_objective(cfg: TrainConfig, where: Callable[[str], str]) -> None:
    """Exactly one of ``loss`` / ``phases``; every loss spec builds; only the last phase may be open-ended."""
    from mmpref.losses import build_loss

    if (cfg.loss is None) == (not cfg.phases):
        raise ConfigError(f"{where('loss')}: give exactly one of `loss` (one objective) or `phases` (a recipe)")
    specs = (
        [("loss", cfg.loss)]
        if cfg.loss is not None
        else [(f"phases.{i}.loss", p.loss) for i, p in enumerate(cfg.phases)]
    )
    for key, spec in specs:
        try:
            build_loss(spec)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where(key)}: {e}") from None
    for i, p in enumerate(cfg.phases):
        if p.epochs is not None and p.max_steps is not None:
            raise ConfigError(f"{where(f'phases.{i}')}: give `epochs` or `max_steps`, not both")
        if p.epochs is None and p.max_steps is None and i < len(cfg.phases) - 1:
            raise ConfigError(f"{where(f'phases.{i}')}: only the last phase may omit `epochs`/`max_steps`")
        if (p.epochs is not None and p.epochs <= 0) or (p.max_steps is not None and p.max_steps <= 0):
            raise ConfigError(f"{where(f'phases.{i}')}: `epochs`/`max_steps` must be positive")
    if cfg.train.grad_accum < 1 or cfg.train.batch_size < 1:
        raise ConfigError(f"{where('train')}: batch_size and grad_accum must be >= 1")


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts/lists (YAML-safe) from a config; the inverse of :func:`config_from_dict`."""
    return asdict(cfg) if is_dataclass(cfg) else cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so a run records exactly what it trained with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


# ----- internals ----------------------------------------------------------------------------------------------------
class _KeyError(Exception):
    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    """One file, with its ``defaults:`` bases (paths relative to it) merged underneath, later entries winning."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular `defaults:` include")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = raw.pop("defaults", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml(path.parent / base, (*seen, path.resolve())))
    return _merge(merged, raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: Any, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        if isinstance(raw, list):
            raw = raw[int(k)]
        else:
            raw = raw.setdefault(k, {})
            if not isinstance(raw, (dict, list)):
                raise TypeError(f"{k!r} is not a mapping")
    if isinstance(raw, list):
        raw[int(keys[-1])] = value
    else:
        raw[keys[-1]] = value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(tp: Any, value: Any, key: str, hints: Mapping[str, Any] | None = None) -> Any:
    """``value`` (plain YAML data) checked against the type annotation ``tp``; dataclasses recursively."""
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
                return _build(a, value, key)
            except _KeyError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise _KeyError(label, f"expected {_name(tp)}, got {value!r}")
    if is_dataclass(tp):
        if is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _KeyError(label, f"expected a mapping ({tp.__name__}), got {value!r}")
        hints = hints or _hints(tp)
        known = {f.name for f in fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            prefix = f"{key}." if key else ""
            raise _KeyError(f"{prefix}{unknown[0]}", f"unknown key; {tp.__name__} accepts {sorted(known)}")
        kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        missing = [f.name for f in fields(tp) if f.name not in kwargs and _required(f)]
        if missing:
            raise _KeyError(f"{key}.{missing[0]}" if key else missing[0], "required")
        return tp(**kwargs)
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


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
