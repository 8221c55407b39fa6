"""Sampling completions from a causal LM, for everything that generates text: the KL samples of the ``kl`` term,
evaluation (the text demo), and ``mmpref generate``-style inspection.

Prompts are token-id lists of any lengths; they are left-padded into one batch for ``model.generate`` (the
convention decoder-only models need), and each completion is cut after its first EOS (kept) so that padding after
it never reaches a score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def generate_completions(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int | None,
                         max_new_tokens: int, *, do_sample: bool = True, temperature: float = 1.0,
                         top_p: float = 1.0) -> list[list[int]]:
    """Completion token ids for each prompt (at least one token each), in prompt order. ``model`` is used as it is
    (put it in eval mode first: dropout would change the samples)."""
    if not prompts:
        return []
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=attn, use_cache=True, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row)
        completions.append(row[: max(cut, 1)])
    return completions
