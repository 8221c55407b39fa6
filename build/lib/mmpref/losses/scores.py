"""What adapters hand to the loss core: per-sample scores, nothing about models.

Grouped data (pairs and sets) uses tensors of shape ``(B, 1+K)``: column 0 is the winner, columns ``1..K`` its
``K >= 1`` losers. Unpaired data (KTO, BCO) uses shape ``(B,)`` plus a boolean ``labels`` tensor.
See ``docs/losses.md`` for the notation used throughout the core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

ScoreKind = Literal["lp", "mean_lp", "ratio", "mean_ratio", "log_odds"]


@dataclass
class Scores:
    """Per-sample log-likelihood scores (or their diffusion ELBO surrogates).

    Attributes:
        policy: ``lp``, the policy's score; ``(B, 1+K)`` grouped or ``(B,)`` unpaired. Gradients flow through it.
        reference: ``lp_ref``, the frozen reference's score, same shape; ``None`` for reference-free losses.
        lengths: ``n(y)``, completion token counts, same shape; needed by length-normalised losses.
        labels: unpaired only, ``(B,)`` bool, True for desirable rows.
        kl_policy, kl_reference: ``(M,)`` scores of extra completions used only for KL estimates: KTO's mismatched
            (prompt, completion) pairs, or the policy's own samples for the ``kl`` regulariser.
        win_prob: SPPO's win probabilities ``P``, shape ``(B, 1+K)``; hard labels (1 for the winner, 0 for losers)
            when ``None``.
        weights: unpaired only, ``(B,)`` weights of the undesirable rows' losses: BCO's prompt density ratios
            (:mod:`mmpref.data.udm`); desirable rows ignore them. ``None``: all 1.
        log_weights: grouped only, ``(B, 1+K)`` per-response log importance weights (WPO: the policy's mean
            ``log p(y_t) - log sum_v p(v)^2``); each pair's loss of a preference head is multiplied by
            ``exp(log_weights(y_w) + log_weights(y_l))``, a per-group loss by ``exp`` of the group's sum. Detached.
    """

    policy: Tensor
    reference: Tensor | None = None
    lengths: Tensor | None = None
    labels: Tensor | None = None
    kl_policy: Tensor | None = None
    kl_reference: Tensor | None = None
    win_prob: Tensor | None = None
    weights: Tensor | None = None
    log_weights: Tensor | None = None

    @property
    def grouped(self) -> bool:
        return self.labels is None

    def to(self, device: torch.device | str) -> Scores:
        return Scores(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


def _move(t: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if t is None else t.to(device)


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 or wider, whatever the model's dtype (bf16 scores are promoted)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ScoreView:
    """Shared arithmetic over a :class:`Scores`, written once and computed lazily.

    Everything is cast to :func:`compute_dtype`; reference scores (and KL/win-probability inputs) are detached so
    gradients only reach the policy scores.
    """

    def __init__(self, scores: Scores):
        self.scores = scores
        self.dtype = compute_dtype(scores.policy)

    def _cast(self, t: Tensor | None, detach: bool = False) -> Tensor | None:
        if t is None:
            return None
        t = t.detach() if detach else t
        return t.to(self.dtype)

    # ----- raw scores -------------------------------------------------------------------------------------------
    @cached_property
    def lp(self) -> Tensor:
        return self._cast(self.scores.policy)

    @cached_property
    def lp_ref(self) -> Tensor:
        if self.scores.reference is None:
            raise ValueError("this loss needs reference scores: `Scores.reference` is None")
        return self._cast(self.scores.reference, detach=True)

    @cached_property
    def n(self) -> Tensor:
        if self.scores.lengths is None:
            raise ValueError("this loss needs completion lengths: `Scores.lengths` is None")
        return self._cast(self.scores.lengths, detach=True).clamp_min(1)

    @cached_property
    def labels(self) -> Tensor:
        return self.scores.labels.bool()

    @cached_property
    def batch_size(self) -> int:
        return self.scores.policy.shape[0]

    @cached_property
    def win_prob(self) -> Tensor:
        """SPPO's ``P`` per response; hard labels (winner 1, losers 0) when ``Scores.win_prob`` is None."""
        if self.scores.win_prob is not None:
            return self._cast(self.scores.win_prob, detach=True)
        hard = torch.zeros_like(self.lp, requires_grad=False)
        hard[:, 0] = 1.0
        return hard

    @cached_property
    def undesirable_weights(self) -> Tensor | None:
        """``Scores.weights`` (detached) where a row is undesirable, 1 where desirable; None without weights."""
        if self.scores.weights is None:
            return None
        return torch.where(self.labels, 1.0, self._cast(self.scores.weights, detach=True))

    @cached_property
    def kl_lp(self) -> Tensor:
        """Policy scores of the KL samples ``(M,)``; differentiable (the ``kl`` regulariser trains through them)."""
        return self._cast(self.scores.kl_policy)

    @cached_property
    def kl_gap(self) -> Tensor:
        """``log pi(y) - log ref(y)`` on the KL samples ``(M,)``; only the policy part carries gradients."""
        return self.kl_lp - self._cast(self.scores.kl_reference, detach=True)

    # ----- derived quantities -------------------------------------------------------------------------------------
    @cached_property
    def ratio(self) -> Tensor:
        """``r(y) = lp(y) - lp_ref(y)``."""
        return self.lp - self.lp_ref

    @cached_property
    def mean_lp(self) -> Tensor:
        """``lp(y) / n(y)``: the mean token log-prob."""
        return self.lp / self.n

    @cached_property
    def mean_ratio(self) -> Tensor:
        """``r(y) / n(y)``: the length-averaged log-ratio (IPO's default)."""
        return self.ratio / self.n

    @cached_property
    def log_odds(self) -> Tensor:
        """``log(p / (1 - p))`` with ``p = exp(mean_lp)``, via a stable ``log1mexp``."""
        return self.mean_lp - log1mexp(self.mean_lp)

    @cached_property
    def chosen_nll(self) -> Tensor:
        """Token-mean NLL of the winners, ``(B,)``."""
        return -chosen(self.mean_lp)

    def get(self, kind: ScoreKind) -> Tensor:
        """One of the per-response scores by name: ``lp``, ``mean_lp``, ``ratio``, ``mean_ratio`` or ``log_odds``.

        Lets options such as ``form="mean" | "sum"`` pick a score without a branch per loss.
        """
        if kind not in ("lp", "mean_lp", "ratio", "mean_ratio", "log_odds"):
            raise ValueError(f"unknown score kind {kind!r}")
        return getattr(self, kind)


def chosen(x: Tensor) -> Tensor:
    """Winner column ``(B,)`` of a grouped ``(B, 1+K)`` tensor."""
    return x[:, 0]


def rejected(x: Tensor) -> Tensor:
    """Loser columns ``(B, K)`` of a grouped ``(B, 1+K)`` tensor."""
    return x[:, 1:]


def margin(x: Tensor) -> Tensor:
    """Winner minus each loser, ``(B, K)``: ``h`` when ``x`` holds log-ratios."""
    return x[:, :1] - x[:, 1:]


def global_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Detached mean of ``x`` over every process, and the global element count.

    Sum and count are all-reduced (not the per-process means), so uneven shards are weighted correctly. Without an
    initialised process group this is the local mean. An empty ``x`` gives mean 0.
    """
    x = x.detach()
    total = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total[0] / total[1].clamp_min(1), total[1]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable near 0 and for very negative x (Maechler 2012).

    torch has no public log1mexp; this is the standard two-branch formula.
    """
    x = x.clamp_max(-torch.finfo(x.dtype).tiny)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
