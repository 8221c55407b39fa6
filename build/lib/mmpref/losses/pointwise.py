"""Pointwise heads on unpaired data: each response scored on its own (formula sheet, "Pointwise heads").

Scores are ``(B,)`` with boolean ``labels`` (True = desirable). Rewards are ``beta * r`` per sample. Both heads
compare the reward with a batch-level shift that is detached and, under ``torch.distributed``, all-reduced so
every process uses the same value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import in_range, non_negative, one_of, optional, positive, register_loss
from .scores import ScoreView, global_mean


@register_loss("kto", data="unpaired", needs_kl=True,
               checks={"beta": positive(), "lambda_d": non_negative(), "lambda_u": non_negative()})
def kto(
    view: ScoreView, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Kahneman-Tversky Optimisation: desirable ``lambda_d * (1 - s(beta*(r - z0)))``,
    undesirable ``lambda_u * (1 - s(beta*(z0 - r)))``.

    ``z0 = max(0, mean(kl_policy - kl_reference))`` estimates KL(pi || ref) on mismatched (prompt, completion)
    pairs of the batch (``Scores.kl_policy`` / ``kl_reference``); it is detached and all-reduced across processes.
    Intuition: a prospect-theory value function with the KL as reference point: desirable outputs gain only by
    beating it, undesirable ones lose only by exceeding it; ``lambda_d / lambda_u`` trade off imbalanced labels.
    Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306).
    """
    z0 = global_mean(view.kl_gap)[0].clamp_min(0)
    z = beta * (view.ratio - z0)
    losses = torch.where(view.labels, lambda_d * (1 - torch.sigmoid(z)), lambda_u * (1 - torch.sigmoid(-z)))
    return losses, {"kl/z0": z0}


@register_loss("bco", data="unpaired", stateful=True,
               checks={"beta": positive(), "momentum": optional(in_range(0, 1, hi_closed=False)),
                       "shift": one_of("class_means", "all_rewards")})
def bco(
    view: ScoreView, *, beta: float = 0.1, momentum: float | None = None, shift: str = "class_means",
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Binary Classifier Optimisation: desirable ``-ls(beta*r - delta)``, undesirable ``-ls(-(beta*r - delta))``.

    Intuition: a logistic classifier whose logit is the implicit reward; the shift ``delta`` centres it so the
    classifier separates labels rather than drifting with the reward level.
    ``shift="class_means"`` (default, the paper's): ``delta = (E+[r] + E-[r]) / 2``, the midpoint of the desirable
    and the undesirable class means, each a moving estimate (with one class not yet seen, that class's mean alone).
    ``"all_rewards"``: the mean of every reward, which weights the classes by their counts (TRL's choice); the two
    differ when the classes are imbalanced. Each moving mean is count-weighted over all training batches
    (``momentum=None``) or an EMA ``m <- momentum*m + (1-momentum)*batch_mean``; it lives in ``state`` (saved by
    ``state_dict``) and is updated, before use, only while grad is enabled (training), from all-reduced batch
    sums; evaluation uses the stored value (0 before the first training step).
    With ``Scores.weights`` (the paper's underlying-distribution matching: a density ratio from a classifier on
    prompt embeddings, clamped to [0.5, 10]; :mod:`mmpref.data.udm`) each undesirable row's loss is multiplied by
    its weight, so undesirable prompts count as if drawn from the desirable prompts' distribution.
    Paper: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv 2404.04656).
    """
    reward = beta * view.ratio
    if torch.is_grad_enabled():
        if shift == "all_rewards":
            _update_running_mean(state, "", reward, momentum)
        else:
            _legacy_to_class_means(state)
            for key, rows in (("desirable_", view.labels), ("undesirable_", ~view.labels)):
                _update_running_mean(state, key, reward[rows], momentum)  # every process calls both (all-reduce)
            seen = [state[f"{k}delta"] for k in ("desirable_", "undesirable_") if state[f"{k}count"] > 0]
            state["delta"] = torch.stack(seen).mean() if seen else state["desirable_delta"]
    delta = state["delta"].to(reward) if "delta" in state else reward.new_zeros(())
    z = reward - delta
    losses = -F.logsigmoid(torch.where(view.labels, z, -z))
    metrics = {"bco/delta": delta.detach()}
    weights = view.undesirable_weights
    if weights is not None:
        losses = losses * weights
        metrics["bco/udm_weight"] = weights[~view.labels].mean()  # NaN without undesirable rows: skipped in logs
    return losses, metrics


def _update_running_mean(state: dict[str, Tensor], key: str, values: Tensor, momentum: float | None) -> None:
    """``state[key + "delta"]``: the running (count-weighted) or EMA mean of ``values`` over batches; a batch with
    no values (on any process) leaves it as it is."""
    batch_mean, n = global_mean(values)
    mean_key, count_key = f"{key}delta", f"{key}count"
    if mean_key not in state or state[count_key] == 0:
        state[mean_key], state[count_key] = batch_mean, n
        return
    if n == 0:
        return
    delta, count = state[mean_key].to(batch_mean), state[count_key].to(batch_mean)
    if momentum is None:
        delta = delta + (batch_mean - delta) * n / (count + n)
    else:
        delta = momentum * delta + (1 - momentum) * batch_mean
    state[mean_key], state[count_key] = delta, count + n


def _legacy_to_class_means(state: dict[str, Tensor]) -> None:
    """A state saved before the class means existed (one running mean of all rewards) continues from that value:
    both class means start at it, with half its count each."""
    if "delta" in state and "desirable_delta" not in state:
        for key in ("desirable_", "undesirable_"):
            state[f"{key}delta"], state[f"{key}count"] = state["delta"].clone(), state["count"] / 2
