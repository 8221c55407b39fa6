"""Which adapter serves which ``modality:`` of a config.

The registry lives here, below the config loader and the adapters, so that typing a config (which needs the
adapter's ``model_config_class`` / ``data_config_class``) does not make the config layer import the adapters.
Built-in adapters are named by import path and imported on first use, as transformers' auto classes do; a new
adapter registers itself with :func:`register_adapter`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_BUILTIN: dict[str, str] = {
    "llm": "mmpref.adapters.llm:LLMAdapter",
    "diffusion": "mmpref.adapters.diffusion:DiffusionAdapter",
}
_LOADERS: dict[str, Callable[[], type]] = {}


def register_adapter(name: str, loader: Callable[[], type]) -> None:
    """Register an adapter class under ``name`` (``loader`` returns it; importing it may be expensive)."""
    _LOADERS[name] = loader


def available_modalities() -> list[str]:
    return sorted({*_BUILTIN, *_LOADERS})


def get_adapter_class(name: str) -> Any:
    """The adapter class registered for ``name`` (a KeyError naming the available ones otherwise)."""
    if name in _LOADERS:
        return _LOADERS[name]()
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown modality {name!r}; available: {', '.join(available_modalities())}")
