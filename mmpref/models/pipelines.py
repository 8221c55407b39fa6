"""One door to the audio pipelines mmpref trains and samples: a preset name or a folder -> the right family.

Families: :class:`~mmpref.models.tango.TangoPipeline` (Tango / Tango 2; presets ``tiny``, ``tango``) and
:class:`~mmpref.models.audioldm2.AudioLDM2Family` (diffusers' ``AudioLDM2Pipeline``; preset ``audioldm2-tiny``).
A folder's family is the ``_class_name`` in its ``model_index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("TangoPipeline", "AudioLDM2Pipeline")  # model_index.json's _class_name of each family


def preset_names() -> list[str]:
    from mmpref.models.audioldm2 import PRESET
    from mmpref.models.tango.presets import PRESETS

    return [*PRESETS, PRESET]


def pipeline_from_preset(name: str, seed: int = 0, tokenizer: Any = None) -> Any:
    """Random weights from a preset (downloads nothing)."""
    from mmpref.models.audioldm2 import PRESET, AudioLDM2Family
    from mmpref.models.tango import TangoPipeline

    if name == PRESET:
        return AudioLDM2Family.from_preset(name, seed=seed)
    return TangoPipeline.from_preset(name, seed=seed, tokenizer=tokenizer)


def pipeline_from_pretrained(path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                             tokenizer: Any = None) -> Any:
    """Load a saved pipeline folder with the class its ``model_index.json`` names."""
    from mmpref.models.audioldm2 import AudioLDM2Family
    from mmpref.models.tango import TangoPipeline

    cls = AudioLDM2Family if family_of(path) == "AudioLDM2Pipeline" else TangoPipeline
    return cls.from_pretrained(path, torch_dtype=torch_dtype, tokenizer=tokenizer)


def family_of(path: str | os.PathLike) -> str:
    """``TangoPipeline`` or ``AudioLDM2Pipeline``; a clear error for any other diffusers pipeline."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return "TangoPipeline"  # an older mmpref folder (pipeline.json), or not a pipeline: TangoPipeline says which
    name = json.loads(index.read_text()).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{path} holds a diffusers {name} (model_index.json), which mmpref does not support; it "
                         f"trains and samples {' and '.join(FAMILIES)} folders")
    return name


__all__ = ["FAMILIES", "family_of", "pipeline_from_preset", "pipeline_from_pretrained", "preset_names"]
