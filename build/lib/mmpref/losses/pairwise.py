"""Pairwise preference heads: one loss per (winner, loser) pair, ``(B, K)``, averaged over the K losers.

Rows of the table in ``docs/losses.md``. Notation: ``r = lp - lp_ref``,
``h = r(y_w) - r(y_l)``, ``ls = log sigma``, ``s = sigma``. Each function returns ``(B, K)`` per-pair losses (the
registry averages the K pairs) or ``(B,)`` per-group losses, optionally with a dict of extra metrics.
Everything is built from ``F.logsigmoid`` / ``logsumexp`` so it stays finite for ``|beta * h|`` up to 1e4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import in_range, non_negative, one_of, positive, register_loss
from .scores import ScoreKind, ScoreView, chosen, margin, rejected


def _ratio_kind(params: dict) -> ScoreKind:
    """``form="mean"`` -> length-averaged log-ratios, ``"sum"`` -> summed (IPO's option)."""
    return "mean_ratio" if params["form"] == "mean" else "ratio"


# f-DPO: DPO's log-ratio is f'(u) of reverse KL at u = pi/ref; other f-divergences put their own f'(u) there.
DIVERGENCE = {"divergence": one_of("reverse_kl", "forward_kl", "js", "alpha"),
              "f_alpha": in_range(0, 1, lo_closed=False, hi_closed=False)}


def f_ratio(view: ScoreView, divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """``f'(u)`` at ``u = pi(y) / ref(y)`` for every member, ``(B, 1+K)``; reverse KL gives ``r`` itself.

    forward KL ``1 - 1/u``; Jensen-Shannon ``log(2u / (1 + u)) = log 2 + ls(r)``; alpha-divergence
    ``(1 - u^-alpha) / alpha`` (``f_alpha`` in (0, 1); towards 0 it is reverse KL, towards 1 forward KL).
    Paper: Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (f-DPO, arXiv 2309.16240), Table 1. TRL's ``f_alpha_divergence_coef`` c is
    ``1 - f_alpha`` here (they agree at the default 0.5).
    """
    r = view.ratio
    if divergence == "forward_kl":
        return -torch.expm1(-r)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(r)
    if divergence == "alpha":
        return -torch.expm1(-f_alpha * r) / f_alpha
    return r


def _winner_nll(view: ScoreView, form: str) -> Tensor:
    """NLL of the winners, ``(B, 1)`` so it broadcasts over the K pairs: token mean or sequence sum."""
    return -chosen(view.get("mean_lp" if form == "mean" else "lp")).unsqueeze(1)


# ----- reference-based, Bradley-Terry family ---------------------------------------------------------------------
@register_loss("dpo", checks={"beta": positive(), **DIVERGENCE})
def dpo(view: ScoreView, *, beta: float = 0.1, divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """Direct Preference Optimization: ``-log sigma(beta * h)``.

    Intuition: a Bradley-Terry model whose reward is the policy/reference log-ratio; raising the winner's ratio
    over the loser's lowers the loss, saturating once the margin is large.
    Paper: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290).
    Diffusion (Tango 2, Wallace et al. 2023): with ``lp = -1/2 * mse`` and beta 2000 this is diffusion-DPO.
    ``divergence`` (f-DPO): the margin of :func:`f_ratio` instead of ``h``; ``reverse_kl`` is DPO.
    """
    return -F.logsigmoid(beta * margin(f_ratio(view, divergence, f_alpha)))


@register_loss("cdpo", checks={"beta": positive(), "e": in_range(0, 0.5), **DIVERGENCE})
def cdpo(view: ScoreView, *, beta: float = 0.1, e: float = 0.1, divergence: str = "reverse_kl",
         f_alpha: float = 0.5) -> Tensor:
    """Conservative DPO (label smoothing): ``-(1 - e) * ls(beta*h) - e * ls(-beta*h)``.

    Intuition: the label is right with probability ``1 - e``; the target preference is ``1 - e`` instead of 1, so
    the optimum margin is finite (``h* = log((1-e)/e) / beta``) rather than pushed to infinity. ``e = 0`` is DPO.
    Paper: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (the cDPO note, no arXiv id).
    ``divergence``: as in :func:`dpo`.
    """
    z = beta * margin(f_ratio(view, divergence, f_alpha))
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


@register_loss("rdpo", checks={"beta": positive(), "e": in_range(0, 0.5, hi_closed=False), **DIVERGENCE})
def rdpo(view: ScoreView, *, beta: float = 0.1, e: float = 0.1, divergence: str = "reverse_kl",
         f_alpha: float = 0.5) -> Tensor:
    """Robust DPO: ``[-(1 - e) * ls(beta*h) + e * ls(-beta*h)] / (1 - 2e)``.

    Intuition: if each label is flipped independently with rate ``e``, the expectation of this loss over the flips
    equals the clean DPO loss (an unbiased de-noised estimator); unlike cDPO it does not cap the margin.
    ``e = 0`` is DPO; ``e`` must be below 1/2 (at 1/2 the labels carry no information).
    Paper: Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409). ``divergence``: as in :func:`dpo`.
    """
    z = beta * margin(f_ratio(view, divergence, f_alpha))
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)


@register_loss("exo", checks={"beta": positive(), "e": in_range(0, 0.5, lo_closed=False), **DIVERGENCE})
def exo(view: ScoreView, *, beta: float = 0.1, e: float = 1e-3, divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> Tensor:
    """EXO (pairwise): ``s(beta*h) * (ls(beta*h) - log(1-e)) + s(-beta*h) * (ls(-beta*h) - log e)``.

    Intuition: the reverse KL from the policy's implied preference ``(s(beta*h), s(-beta*h))`` to the smoothed label
    ``(1 - e, e)``; being mode-seeking, it matches the RLHF optimum rather than DPO's forward-KL fit.
    Paper: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (arXiv 2402.00856),
    pairwise form as in TRL's ``exo_pair``; K losers are averaged pairwise. ``divergence``: as in :func:`dpo`.
    """
    z = beta * margin(f_ratio(view, divergence, f_alpha))
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(e)
    )


@register_loss("ipo", checks={"tau": positive(), "form": one_of("mean", "sum"), **DIVERGENCE},
               needs_lengths=lambda p: p["form"] == "mean", reward=_ratio_kind, reward_scale="tau")
def ipo(view: ScoreView, *, tau: float = 0.1, form: str = "mean", divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """Identity Preference Optimisation: ``(h' - (P - 1/2)/tau)^2``; hard labels (``P = 1``): ``(h' - 1/(2*tau))^2``.

    Intuition: regress the margin onto a fixed target instead of pushing it to infinity, so the policy cannot
    drift arbitrarily far from the reference on deterministic preferences; minimised at ``h' = (P - 1/2)/tau``.
    ``h'`` uses length-averaged log-ratios ``r(y)/n(y)`` by default (``form="mean"``, needs lengths), or summed
    ones (``form="sum"``).
    Soft labels: ``P = Pr(y_w beats y_l)``, from ``Scores.win_prob`` as ``(1 + P_w - P_l) / 2`` (exactly the pair's
    preference when ``P_l = 1 - P_w``, as online IPO's labelled pairs are; hard labels give 1). The form follows
    from the paper's sampled loss ``(h - (I - 1/2)/tau)^2`` with the label ``I`` replaced by its expectation (the
    two differ by a constant, the label's variance). ``divergence``: :func:`f_ratio` in place of ``r`` (then
    divided by the length with ``form="mean"``).
    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv 2310.12036).
    """
    psi = f_ratio(view, divergence, f_alpha)
    h = margin(psi / view.n if form == "mean" else psi)
    p = (1 + margin(view.win_prob)) / 2  # (B, K) pair preferences; 1 without Scores.win_prob
    return (h - (p - 0.5) / tau) ** 2, {"ipo/margin": h.detach().mean()}


@register_loss("hinge", checks={"gamma": positive(), **DIVERGENCE}, reward_scale="gamma")
def hinge(view: ScoreView, *, gamma: float = 0.05, divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """Reference-normalised hinge (SLiC-HF / RSO "hinge-norm"): ``max(0, 1 - gamma * h)``.

    Intuition: a max-margin classifier on the log-ratio margin; pairs already separated by ``1/gamma`` give no
    gradient. "norm" means reference-normalised, not length-normalised.
    Papers: Zhao et al. 2023, "SLiC-HF" (arXiv 2305.10425); Liu et al. 2023, "Statistical Rejection Sampling
    Improves Preference Optimization" (RSO, arXiv 2309.06657), gamma 0.05. ``divergence``: as in :func:`dpo`.
    """
    return F.relu(1 - gamma * margin(f_ratio(view, divergence, f_alpha)))


@register_loss("sppo", checks={"beta": positive(), "reduce": one_of("sum", "mean")})
def sppo(view: ScoreView, *, beta: float = 1e-3, reduce: str = "sum") -> Tensor:
    """Self-Play Preference Optimisation: ``(r(y_w) - eta*(P_w - 1/2))^2 + (r(y_l) - eta*(P_l - 1/2))^2``.

    Intuition: each response's log-ratio regresses onto its centred win probability scaled by ``eta = 1/beta``
    (a multiplicative-weights step of a two-player game); winners move up, losers down, each on its own scale.
    ``P`` comes from ``Scores.win_prob`` (win probability vs the current policy's samples); without it hard labels
    ``P_w = 1, P_l = 0`` are used. The reference is the previous iterate. Default beta 1e-3 (paper's eta = 1e3).
    ``reduce="sum"`` (default) adds the two terms, as TRL's ``sppo_hard`` does; ``"mean"`` halves that, as the
    authors' trainer (uclaml/SPPO) does: the same minimiser, half the gradient.
    Paper: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (arXiv 2405.00675).
    """
    sq = (view.ratio - (view.win_prob - 0.5) / beta) ** 2
    pair = chosen(sq).unsqueeze(1) + rejected(sq)
    return pair if reduce == "sum" else pair / 2


@register_loss("nca", checks={"beta": positive()})
def nca(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """Noise Contrastive Alignment (pairwise): ``-ls(beta*r_w) - 1/2 * ls(-beta*r_w) - 1/2 * ls(-beta*r_l)``.

    Intuition: classifies each response's absolute reward against noise instead of only the relative margin, so
    the winner's likelihood is pushed up rather than only the gap (DPO can lower both).
    Paper: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (arXiv 2402.05369), pairwise form as in TRL's ``nca_pair``.
    """
    zw, zl = beta * chosen(view.ratio).unsqueeze(1), beta * rejected(view.ratio)
    return -F.logsigmoid(zw) - 0.5 * F.logsigmoid(-zw) - 0.5 * F.logsigmoid(-zl)


@register_loss("apo_zero", checks={"beta": positive()})
def apo_zero(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """Anchored Preference Optimisation, zero variant: ``(1 - s(beta*r_w)) + s(beta*r_l)``.

    Intuition: anchored to the reference, raise the winner's likelihood and lower the loser's independently; use
    when the winners are better than the model's own outputs.
    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv 2408.06266), Eq. 7.
    """
    return (1 - torch.sigmoid(beta * chosen(view.ratio).unsqueeze(1))) + torch.sigmoid(beta * rejected(view.ratio))


@register_loss("apo_down", checks={"beta": positive()})
def apo_down(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """Anchored Preference Optimisation, down variant: ``s(beta*r_w) + (1 - s(beta*h))``.

    Intuition: lower the winner's likelihood, and the loser's more; use when even the winners are worse than the
    model's own outputs.
    Paper: D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8.
    """
    return torch.sigmoid(beta * chosen(view.ratio).unsqueeze(1)) + (1 - torch.sigmoid(beta * margin(view.ratio)))


@register_loss("set", checks={"beta": positive()})
def set_(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """Multi-negative softmax: ``-log( e^{beta r_w} / (e^{beta r_w} + sum_k e^{beta r_lk}) )``, per group ``(B,)``.

    Intuition: one softmax over the whole winner/loser set (the Plackett-Luce top-1 likelihood), so the hardest
    negatives dominate the gradient; with K = 1 it is exactly DPO. Not a mean over pairs.
    Paper: Chen et al. 2024, "On Softmax Direct Preference Optimization for Recommendation" (S-DPO,
    arXiv 2406.09215); Plackett-Luce form in Rafailov et al. 2023 (arXiv 2305.18290, App. A.3).
    """
    z = beta * view.ratio
    return torch.logsumexp(z, dim=1) - chosen(z)


@register_loss("sigmoid_norm", checks={"beta": positive(), **DIVERGENCE}, needs_lengths=True, reward="mean_ratio")
def sigmoid_norm(view: ScoreView, *, beta: float = 0.1, divergence: str = "reverse_kl",
                 f_alpha: float = 0.5) -> Tensor:
    """Length-normalised DPO: ``-ls(beta * (r(y_w)/n(y_w) - r(y_l)/n(y_l)))``.

    Intuition: DPO on per-token log-ratios, so a long response does not win or lose by its length alone.
    TRL's ``sigmoid_norm`` (no paper of its own; the same normalisation as IPO's length-averaged margin).
    ``divergence``: :func:`f_ratio` in place of ``r``, then divided by the length.
    """
    psi = f_ratio(view, divergence, f_alpha) / view.n
    return -F.logsigmoid(beta * margin(psi))


@register_loss("discopop", checks={"beta": positive(), "tau": positive(), **DIVERGENCE})
def discopop(view: ScoreView, *, beta: float = 0.1, tau: float = 0.05, divergence: str = "reverse_kl",
             f_alpha: float = 0.5) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): ``(1 - m) * (-ls(z)) + m * exp(-z)``, ``z = beta*h``, ``m = s(z/tau)``.

    Intuition: a blend, discovered by an LLM-driven search, of DPO's logistic loss (for pairs ranked the wrong way)
    and an exponential loss (for pairs already ranked right), switched by the margin's sign at temperature tau.
    ``m * exp(-z)`` is computed as ``exp(ls(z/tau) - z)``, so a very negative margin cannot give ``0 * inf``.
    Paper: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models"
    (arXiv 2406.08414), Eq. 5; tau 0.05. ``divergence``: as in :func:`dpo`.
    """
    z = beta * margin(f_ratio(view, divergence, f_alpha))
    m = torch.sigmoid(z / tau)
    return (1 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def _smoothed_logistic(z: Tensor, e: float) -> Tensor:
    """``-(1 - e) * ls(z) - e * ls(-z)``: the logistic loss with labels smoothed by ``e``."""
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


@register_loss("aot", checks={"beta": positive(), "e": in_range(0, 0.5)})
def aot(view: ScoreView, *, beta: float = 0.1, e: float = 0.0) -> Tensor:
    """Alignment via Optimal Transport, paired: ``-(1-e) ls(beta*d) - e ls(-beta*d)``,
    ``d = sort(lp_w - lp_l) - sort(lp_ref_w - lp_ref_l)``, each sorted over the batch.

    Intuition: first-order stochastic dominance of the policy's chosen-over-rejected log-likelihood margins over the
    reference's, enforced quantile by quantile (the 1-D optimal transport plan is the sorted matching), instead of
    pair by pair. Batch-level: row i's loss pairs the i-th smallest margins, sorted within each process's micro-batch
    (each loser column separately with K losers).
    Paper: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv 2406.05882).
    """
    d = margin(view.lp).sort(dim=0).values - margin(view.lp_ref).sort(dim=0).values
    return _smoothed_logistic(beta * d, e)


@register_loss("aot_unpaired", checks={"beta": positive(), "e": in_range(0, 0.5)})
def aot_unpaired(view: ScoreView, *, beta: float = 0.1, e: float = 0.0) -> Tensor:
    """Alignment via Optimal Transport, unpaired: ``d = sort(r(y_w)) - sort(r(y_l))``, each sorted over the batch.

    Intuition: the chosen log-ratios' distribution should dominate the rejected ones' quantile by quantile, without
    using which chosen and rejected responses share a prompt (for data whose pairs are not meaningful).
    Paper: Melnyk et al. 2024 (arXiv 2406.05882).
    """
    d = chosen(view.ratio).sort(dim=0).values.unsqueeze(1) - rejected(view.ratio).sort(dim=0).values
    return _smoothed_logistic(beta * d, e)


@register_loss("bco_pair", checks={"beta": positive()})
def bco_pair(view: ScoreView, *, beta: float = 0.1) -> Tensor:
    """BCO on pairs, no reward shift: ``-ls(beta*r(y_w)) - ls(-beta*r(y_l))``.

    Intuition: a binary classifier on the implicit reward, the winner labelled 1 and the loser 0, each on its own.
    The paired form of TRL's ``bco_pair``; the unpaired ``bco`` adds the paper's moving shift.
    Paper: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment" (arXiv 2404.04656).
    """
    return -F.logsigmoid(beta * chosen(view.ratio)).unsqueeze(1) - F.logsigmoid(-beta * rejected(view.ratio))


# ----- reference-free -------------------------------------------------------------------------------------------
@register_loss("slic", needs_reference=False, checks={"delta": positive()}, reward="lp", reward_scale=None)
def slic(view: ScoreView, *, delta: float = 1.0) -> Tensor:
    """SLiC calibration hinge (reference-free): ``max(0, delta - lp(y_w) + lp(y_l))``.

    Intuition: the winner must out-score each loser by ``delta`` nats; pairs already that far apart are ignored.
    ``delta = 1/gamma`` of the reference-normalised ``hinge``. Add ``sft`` for SLiC-HF's regulariser.
    Paper: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv 2305.10425).
    """
    return F.relu(delta - margin(view.lp))


def alpha_reward(lp: Tensor, alpha_po: float) -> Tensor:
    """AlphaPO's reward shape ``(1 - p^-alpha) / alpha`` with ``p = exp(lp)``; ``alpha = 0`` is ``lp`` itself.

    Paper: Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv 2501.03884).
    """
    return lp if alpha_po == 0 else -torch.expm1(-alpha_po * lp) / alpha_po


_ALPHA_PO = {"alpha_po": in_range(-math.inf, math.inf, lo_closed=False, hi_closed=False)}


@register_loss("simpo", needs_reference=False, needs_lengths=True, reward="mean_lp",
               checks={"beta": positive(), "gamma": non_negative(), "e": in_range(0, 0.5), **_ALPHA_PO})
def simpo(view: ScoreView, *, beta: float = 2.0, gamma: float = 0.5, e: float = 0.0, alpha_po: float = 0.0) -> Tensor:
    """Simple Preference Optimisation: ``-ls(beta * (mean_lp(y_w) - mean_lp(y_l)) - gamma)``.

    Intuition: the length-normalised likelihood is itself the implicit reward (matching how generation ranks
    sequences), and a target margin ``gamma`` separates winners from losers; no reference model needed.
    ``e``: label smoothing, ``-(1-e) ls(z) - e ls(-z)`` on the same ``z``. ``alpha_po`` (AlphaPO): the reward
    ``(1 - p^-alpha) / alpha`` of the per-token probability ``p = exp(mean_lp)`` instead of ``mean_lp``
    (:func:`alpha_reward`; 0 is SimPO).
    Paper: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734); beta 2.0, gamma 0.5 (gamma/beta = 0.25).
    """
    return _smoothed_logistic(beta * margin(alpha_reward(view.mean_lp, alpha_po)) - gamma, e)


@register_loss("cpo", needs_reference=False, reward="lp",
               needs_lengths=lambda p: p["nll_form"] == "mean" or p["pref"] == "ipo",
               checks={"beta": positive(), "alpha": non_negative(), "nll_form": one_of("mean", "sum"),
                       "pref": one_of("sigmoid", "hinge", "ipo"), "e": in_range(0, 0.5), **_ALPHA_PO})
def cpo(
    view: ScoreView, *, beta: float = 0.1, alpha: float = 1.0, nll_form: str = "mean", pref: str = "sigmoid",
    e: float = 0.0, alpha_po: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contrastive Preference Optimisation: ``-ls(beta * (lp(y_w) - lp(y_l))) + alpha * NLL(y_w)``.

    Intuition: DPO with a uniform reference (so no reference model) plus a behaviour-cloning term on the winners
    that keeps the policy on the preferred data. ``NLL`` is the token-mean NLL (``nll_form="mean"``, needs lengths)
    or the sequence sum (``"sum"``).
    ``pref`` picks the preference term on ``m = lp(y_w) - lp(y_l)``: ``sigmoid`` (the paper's, label-smoothed by
    ``e``), ``hinge`` ``max(0, 1 - beta*m)``, or ``ipo`` ``(m' - 1/(2 beta))^2`` with token-mean ``m'`` (needs
    lengths). ``alpha_po`` (AlphaPO): each ``lp`` replaced by :func:`alpha_reward` (use with care on summed
    log-likelihoods: ``p^-alpha`` of a long sequence overflows).
    Paper: Xu et al. 2024, "Contrastive Preference Optimization" (arXiv 2401.08417); beta 0.1, alpha 1.0.
    """
    nll = _winner_nll(view, nll_form)
    if pref == "ipo":
        term = (margin(alpha_reward(view.mean_lp, alpha_po)) - 1 / (2 * beta)) ** 2
    else:
        m = margin(alpha_reward(view.lp, alpha_po))
        term = F.relu(1 - beta * m) if pref == "hinge" else _smoothed_logistic(beta * m, e)
    return term + alpha * nll, {"cpo/nll": nll.detach().mean()}


@register_loss("orpo", needs_reference=False, needs_lengths=True, reward="mean_lp", reward_scale="lam",
               checks={"lam": non_negative()})
def orpo(view: ScoreView, *, lam: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Odds-Ratio Preference Optimisation: ``NLL(y_w) - lam * ls(logodds(y_w) - logodds(y_l))``.

    ``lam`` is the paper's lambda (renamed: ``lambda`` is a Python keyword). ``logodds(y) = m - log(1 - e^m)`` with
    ``m = mean_lp(y)``, computed with a stable ``log1mexp``; ``NLL`` is the winner's token-mean NLL.
    Intuition: SFT on the winners plus a penalty that widens the odds ratio of winner over loser, in one stage and
    without a reference model.
    Paper: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv 2403.07691); lambda 0.1.
    """
    log_odds_ratio = margin(view.log_odds)
    nll = _winner_nll(view, "mean")
    metrics = {"orpo/log_odds_ratio": log_odds_ratio.detach().mean(), "orpo/nll": nll.detach().mean()}
    return nll - lam * F.logsigmoid(log_odds_ratio), metrics


@register_loss("asft", needs_reference=False, needs_lengths=True, reward="mean_lp", reward_scale="lam",
               checks={"lam": non_negative()})
def asft(view: ScoreView, *, lam: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Aligned SFT (pointwise absolute likelihood): ``-log P(y_w) - lam * [ls(logodds(y_w)) + ls(-logodds(y_l))]``.

    ``P(y) = exp(mean_lp(y))``, so ``ls(logodds(y)) = log P(y)`` and ``ls(-logodds(y)) = log(1 - P(y))``: each
    response is classified on its own absolute likelihood (winners towards 1, losers towards 0) rather than
    against the other. Needs no reference. Grouped data; the K losers are averaged.
    Paper: Wang et al. 2024, "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood"
    (arXiv 2409.10571). Not "Anchored SFT".
    """
    nll = _winner_nll(view, "mean")
    pointwise = F.logsigmoid(chosen(view.log_odds)).unsqueeze(1) + F.logsigmoid(-rejected(view.log_odds))
    return nll - lam * pointwise, {"asft/nll": nll.detach().mean()}


@register_loss("spo", needs_reference=False, reward="lp", reward_scale="alpha", checks={"alpha": positive()})
def spo(view: ScoreView, *, alpha: float = 1.0) -> Tensor:
    """Soft Preference Optimisation, preference term: ``-(1/alpha) * ls(alpha * (lp(y_w) - lp(y_l)))``.

    Intuition: a reference-free Bradley-Terry fit whose softmax exponent ``alpha`` controls how deterministic the
    learned preference is; SPO's regularisation is a separate term, add it as ``{"spo": 1, "kl": {"beta": ...}}``
    (KL to the reference, estimated on the policy's own samples).
    Paper: Sharifnassab et al. 2024, "Soft Preference Optimization: Aligning Language Models to Expert
    Distributions" (arXiv 2405.00747).
    """
    return -F.logsigmoid(alpha * margin(view.lp)) / alpha
