"""Which scaled-dot-product-attention kernels PyTorch may pick, by name, for training and for sampling alike.

cuDNN attention is left out by default: on an H100 (torch 2.11) it built a new cuDNN graph for every new text
length, ~21 ms of CPU per attention call, which made bf16 UNet steps 2-3x slower than float32
(docs/benchmarks.md). The choice matters on GPUs in bf16/fp16 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DEFAULT_SDPA_BACKENDS = ("flash", "efficient", "math")


def check_backends(names: Sequence[str], key: str = "attention_backends") -> None:
    """Raise a ValueError naming ``key`` if ``names`` is empty or holds an unknown kernel."""
    unknown = [b for b in names if b not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(f"{key}: unknown or empty {unknown or '[]'}; choose from {list(SDPA_BACKENDS)}")


def attention_kernels(names: Sequence[str]) -> AbstractContextManager:
    """A context in which SDPA may use only the named kernels (in PyTorch's own priority order)."""
    check_backends(names)
    return sdpa_kernel([SDPA_BACKENDS[b] for b in names])
