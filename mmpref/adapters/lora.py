"""LoRA arithmetic both adapters share: the weights a LoRA-wrapped module computes with, and folding an adapter
into its base so the adapter-disabled module becomes the trained one.

Both work on any module peft has injected LoRA layers into (a ``PeftModel`` around a causal LM, or a diffusers
UNet after ``add_adapter``). peft's ``merge_and_unload`` returns a new module, which would leave the optimizer and
the accelerate / DDP wrappers holding the old parameters; folding in place keeps every parameter object.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _delta(layer: nn.Module) -> Tensor:
    """The weight update the layer's active adapters add to its base weight (scaling included)."""
    return sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_weights(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model that computes what ``model`` computes: each LoRA layer's base weight
    plus its adapters' update, under the names the module had before LoRA was injected (no ``base_layer``,
    no ``lora_*`` entries). Copies; ``model`` is left as it is."""
    base = _base_model(model)
    deltas = {f"{name}.weight": _delta(layer) for name, layer in _lora_layers(base)}
    out = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key or key.startswith("lora_"):
                continue
            key = key.replace(".base_layer.", ".")
            value = value.detach().clone()
            if key in deltas:
                value += deltas[key].to(value.dtype)
            out[key] = value
    return out


def fold_lora(model: nn.Module, seed: int) -> int:
    """Add each LoRA layer's update to its base weight and start the adapter afresh, so the module computes what
    it did and the adapter-disabled module is the trained one. Returns the number of layers folded.

    The fresh adapter is peft's default start (A Kaiming-uniform as ``nn.Linear``, B zero), drawn here from a CPU
    generator seeded with ``seed`` rather than by peft's ``reset_lora_parameters``, which draws from the global
    (per-device, per-process) RNG: every process must start from the same A."""
    layers = _lora_layers(_base_model(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.get_base_layer().weight
            weight += _delta(layer).to(weight.dtype)
            for name in layer.active_adapters:
                a = layer.lora_A[name].weight
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                a.copy_(fresh)
                layer.lora_B[name].weight.zero_()
    return len(layers)
