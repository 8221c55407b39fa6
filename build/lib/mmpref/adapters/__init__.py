"""Adapters: each owns one modality and produces the loss core's scores.

``llm`` and ``diffusion`` are found through :mod:`mmpref.modalities` (imported on first use); register another
with :func:`register_adapter`.
"""

from mmpref.modalities import get_adapter_class, register_adapter

from .base import Adapter, LossRequirements

__all__ = ["Adapter", "LossRequirements", "get_adapter_class", "register_adapter"]
