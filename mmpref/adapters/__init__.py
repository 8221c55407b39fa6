"""Adapters: each owns one modality and produces the loss core's scores."""

from .base import Adapter, LossRequirements, get_adapter_class, register_adapter


def _llm():
    from .llm import LLMAdapter

    return LLMAdapter


def _diffusion():
    from .diffusion import DiffusionAdapter

    return DiffusionAdapter


register_adapter("llm", _llm)
register_adapter("diffusion", _diffusion)

__all__ = ["Adapter", "LossRequirements", "get_adapter_class", "register_adapter"]
