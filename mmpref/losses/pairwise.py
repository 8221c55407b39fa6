"""Pairwise preference heads: one loss per (winner, loser) pair, ``(B, K)``, averaged over the K losers.

Rows of the formula sheet (``shared/design/losses.md``, "Pairwise heads"). Notation: ``r = lp - lr``,
``h = r(y_w) - r(y_l)``, ``ls = log sigma``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .registry import in_range, positive, register_loss
from .scores import ScoreView, margin


@register_loss("dpo", checks={"beta": positive()})
def dpo(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """Direct Preference Optimization: ``-log sigma(beta * h)``.

    Intuition: a Bradley-Terry model whose reward is the policy/reference log-ratio; raising the winner's ratio
    over the loser's lowers the loss, saturating once the margin is large.
    Paper: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290).
    Diffusion (Tango 2, Wallace et al. 2023): with ``lp = -1/2 * mse`` and beta 2000 this is diffusion-DPO.
    """
    return -F.logsigmoid(beta * margin(view.ratio))
