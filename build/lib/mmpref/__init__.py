"""mmpref: preference alignment for text and audio generative models.

One loss core (:mod:`mmpref.losses`), two adapters (:mod:`mmpref.adapters`: ``llm`` and ``diffusion``), one training
engine (:func:`mmpref.train`), synthetic audio preference data (:mod:`mmpref.synthesis`, :mod:`mmpref.scoring`).

The public names below are imported on first use, so ``import mmpref`` stays cheap (no diffusers or transformers
until a model or adapter is asked for).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # loss core
    "Scores": "mmpref.losses",
    "LossOutput": "mmpref.losses",
    "get_loss": "mmpref.losses",
    "build_loss": "mmpref.losses",
    "available_losses": "mmpref.losses",
    "register_loss": "mmpref.losses",
    "CombinedLoss": "mmpref.losses",
    # configuration and training
    "TrainConfig": "mmpref.config",
    "ConfigError": "mmpref.config",
    "load_config": "mmpref.config",
    "train": "mmpref.training",
    "TrainResult": "mmpref.training",
    "TrainingError": "mmpref.training",
    # adapters
    "Adapter": "mmpref.adapters",
    "register_adapter": "mmpref.adapters",
    "get_adapter_class": "mmpref.adapters",
    "LLMAdapter": "mmpref.adapters.llm",
    "DiffusionAdapter": "mmpref.adapters.diffusion",
    # models and audio
    "TangoPipeline": "mmpref.models.tango",
    "LogMel": "mmpref.audio",
    "MelConfig": "mmpref.audio",
    "load_audio": "mmpref.audio",
    "save_audio": "mmpref.audio",
    # data
    "load_llm_data": "mmpref.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmpref' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cache: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
