"""Additive regularisers added to a preference head (formula sheet, "Additive regularisers").

They accept grouped and unpaired data (``data="any"``), need no ``Scores.reference`` and are combined by
configuration, e.g. RPO = ``{"dpo": {"beta": 0.05}, "sft": {"eta": 0.005, "beta": 0.05}}`` (the paper's
``eta * beta * NLL`` with the DPO beta; ``{"dpo": 1.0, "sft": 0.005}`` is a plain weight on the summed NLL, 1/beta =
10x RPO's at the default beta 0.1), SPO = ``{"spo": 1.0, "kl": {"beta": 0.1}}``.
Each returns a ``(B,)`` per-sample term whose batch mean is the regulariser.
"""

from __future__ import annotations

from torch import Tensor

from .registry import one_of, positive, register_loss
from .scores import ScoreView, chosen


@register_loss("sft", data="any", additive=True, needs_reference=False, reward_scale=None,
               needs_lengths=lambda p: p["form"] == "mean",
               checks={"eta": positive(), "beta": positive(), "form": one_of("sum", "mean")})
def sft(view: ScoreView, *, eta: float = 1.0, beta: float = 1.0, form: str = "sum") -> Tensor:
    """NLL of the winners: ``eta * beta * (-lp(y_w))`` (``form="sum"``) or ``eta * (-mean_lp(y_w))`` (``"mean"``).

    Intuition: keeps probability mass on the preferred data; RPO shows that adding it to DPO makes the objective
    an adversarial regulariser against reward over-optimisation. ``"sum"`` is the paper's form (RPO: eta 0.005 with
    beta 0.01-0.05, i.e. ``{"dpo": {"beta": 0.05}, "sft": {"eta": 0.005, "beta": 0.05}}``); with the defaults it is
    the plain sequence NLL, so a pure SFT phase is ``{"sft": 1.0}`` (no reference needed). ``"mean"`` needs lengths.
    Diffusion: ``-lp = 1/2 * w(t) * mse``, the winner's plain denoising loss (up to the factor 1/2).
    Winners are column 0 of grouped data, or the desirable rows of unpaired data (mean over those rows).
    Paper: Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
    Adversarial Regularizer" (RPO, arXiv 2405.16436).
    """
    scale = eta * beta if form == "sum" else eta  # the sheet's two forms differ by the beta factor
    nll = -view.get("lp" if form == "sum" else "mean_lp")
    if view.scores.grouped:
        return scale * chosen(nll)
    desirable = view.labels.to(nll.dtype)
    # mean over desirable rows, written per sample so that the registry's batch mean gives it
    return scale * nll * desirable * (view.batch_size / desirable.sum().clamp_min(1))


@register_loss("kl", data="any", additive=True, needs_reference=False, needs_kl=True, reward_scale=None,
               checks={"beta": positive(), "grad": one_of("score", "direct")})
def kl(view: ScoreView, *, beta: float = 0.1, grad: str = "score") -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference on policy samples: ``beta * mean_t[log pi(y_t) - log ref(y_t)]``, ``y_t ~ pi``.

    ``Scores.kl_policy`` / ``kl_reference`` hold the scores of completions sampled from the current policy.
    The value is the plain Monte-Carlo estimate. Its direct gradient, ``mean(grad log pi)``, is zero in
    expectation, so by default (``grad="score"``) the gradient is the score-function estimator
    ``mean((log pi - log ref) * grad log pi)``, unbiased for ``grad KL`` (value unchanged; the extra term's
    expectation is zero). ``grad="direct"`` differentiates the estimate as written.
    Used by SPO (Sharifnassab et al. 2024, arXiv 2405.00747) as ``{"spo": 1, "kl": {"beta": ...}}``.
    """
    gap = view.kl_gap
    value = gap.mean() if gap.numel() else gap.sum()
    if grad == "score":
        surrogate = (gap.detach() * view.kl_lp).mean() if gap.numel() else gap.sum()
        value = value + (surrogate - surrogate.detach())  # adds the score-function gradient, value unchanged
    return (beta * value).expand(view.batch_size), {"kl/estimate": value.detach()}
