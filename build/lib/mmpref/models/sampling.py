"""Sampling completions from a causal LM, for everything that generates text: the KL samples of the ``kl`` term,
evaluation (the text demo), and ``mmpref generate``-style inspection.

Prompts are token-id lists of any lengths; they are left-padded into one batch for ``model.generate`` (the
convention decoder-only models need), and each completion is cut after its first EOS (kept) so that padding after
it never reaches a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def next_token_distribution(policy_logits: torch.Tensor, reference_logits: torch.Tensor | None = None,
                            mixture: float = 0.0, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities of the next token ``(B, V)``: ``softmax(((1 - m) log pi + m log ref) / T)``, the token-level
    geometric mixture of policy and reference renormalised per token (IPO-MD / Nash-MD; ``m = 0``: the policy
    alone), then nucleus-truncated to the smallest set of mass ``>= top_p``."""
    logp = policy_logits.float()  # softmax(log_softmax(x) / T) == softmax(x / T): normalise only to mix
    if mixture:
        logp = (1 - mixture) * torch.log_softmax(logp, dim=-1) + mixture * torch.log_softmax(
            reference_logits.float(), dim=-1)
    probs = torch.softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def sample_completions(model: nn.Module, prompt: Sequence[int], n: int, eos_id: int | None, max_new_tokens: int,
                       generator: torch.Generator, *, reference: nn.Module | None = None, mixture: float = 0.0,
                       temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """``n`` sampled completions of one prompt; see :func:`sample_batch`."""
    return sample_batch(model, [prompt], n, eos_id, max_new_tokens, [generator], pad_id=0, reference=reference,
                        mixture=mixture, temperature=temperature, top_p=top_p)[0]


@torch.no_grad()
def sample_batch(model: nn.Module, prompts: Sequence[Sequence[int]], n: int, eos_id: int | None, max_new_tokens: int,
                 generators: Sequence[torch.Generator], *, pad_id: int, reference: nn.Module | None = None,
                 mixture: float = 0.0, temperature: float = 1.0, top_p: float = 1.0) -> list[list[list[int]]]:
    """``n`` sampled completions of each prompt (token ids, each cut after its first EOS, kept), in one left-padded
    batch of ``len(prompts) * n`` rows.

    Prompt i's tokens are drawn with ``generators[i]`` alone (CPU generators), so the samples depend on the prompts
    of the batch, the weights and the seeds: not on the process, the device's RNG or what else runs. With
    ``mixture > 0`` each token comes from the geometric mixture with ``reference``
    (:func:`next_token_distribution`); both models keep their own KV cache.
    """
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    mixing = bool(mixture) and reference is not None
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    ref_out = reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True) if mixing else None
    done = torch.zeros(len(rows), dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        probs = next_token_distribution(out.logits[:, -1], ref_out.logits[:, -1] if mixing else None, mixture,
                                        temperature, top_p)
        # inverse-CDF sampling: one uniform per row from its prompt's generator, one search for the whole batch
        u = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
        cdf = probs.double().cumsum(-1)
        nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=probs.shape[-1] - 1)[:, 0].cpu()
        for r in range(len(rows)):
            if not done[r]:
                tokens[r].append(int(nxt[r]))
                done[r] = eos_id is not None and int(nxt[r]) == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step = nxt.to(device)[:, None]
        out = _step(model, step, mask, positions, out)
        if mixing:
            ref_out = _step(reference, step, mask, positions, ref_out)
    return [tokens[i * n:(i + 1) * n] for i in range(len(prompts))]


def _step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, previous: Any) -> Any:
    """One decoding step reusing the KV cache (transformers >= 5.2 calls it ``cache``, earlier ``past_key_values``)."""
    kw = {"cache": previous["cache"]} if "cache" in previous else {"past_key_values": previous["past_key_values"]}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw)
