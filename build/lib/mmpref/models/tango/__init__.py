"""Tango / Tango 2 text-to-audio: pipeline, presets and checkpoint conversion (stock diffusers/transformers parts)."""

from mmpref.models.tango.pipeline import TangoPipeline
from mmpref.models.tango.presets import preset_config

__all__ = ["TangoPipeline", "preset_config"]
