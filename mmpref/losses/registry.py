"""The loss registry: each loss is one small registered function; this module does everything they share.

A loss function receives a :class:`ScoreView` and its keyword-only parameters and returns per-pair losses
``(B, K)`` (reduced over the K losers here) or per-sample losses ``(B,)``, optionally with a dict of extra metrics.
Validation, dtype promotion, rewards, accuracies and the weighted combination of several losses live here once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .scores import ScoreKind, Scores, ScoreView, chosen, margin, rejected

DataKind = Literal["grouped", "unpaired", "any"]  # "any": additive terms that accept either layout


@dataclass(frozen=True)
class LossSpec:
    """How a registered loss is called and what it needs."""

    name: str
    fn: Callable[..., Any]
    data: DataKind = "grouped"
    needs_reference: bool | Callable[[dict], bool] = True  # a callable decides from the bound parameters
    needs_lengths: bool | Callable[[dict], bool] = False
    needs_kl: bool = False  # needs Scores.kl_policy / kl_reference (so the adapter needs a reference model too)
    reward: ScoreKind | Callable[[dict], ScoreKind] = "ratio"  # what the reported rewards are made of
    reward_scale: str | Callable[[dict], float] | None = "beta"  # parameter that scales rewards (beta * r); None: 1
    checks: Mapping[str, tuple[str, Callable[[Any], bool]]] = field(default_factory=dict)
    stateful: bool = False  # fn takes a ``state`` dict kept in checkpoints (e.g. bco's reward shift)
    additive: bool = False  # a regulariser added to a preference head (sft, kl)
    validate: Callable[[dict], None] | None = None  # cross-parameter checks at build time; raises ValueError

    @property
    def defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "state"
        }


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, **spec: Any) -> Callable[[Callable], Callable]:
    """Decorator: ``@register_loss("dpo", needs_reference=True)`` on a function ``fn(view, *, beta=0.1)``."""

    def wrap(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        entry = LossSpec(name=name, fn=fn, **spec)
        # catch registration typos at import time rather than at the first call
        named = set(entry.checks) | ({entry.reward_scale} - {None} if isinstance(entry.reward_scale, str) else set())
        unknown = sorted(named - set(entry.defaults))
        if unknown:
            raise ValueError(f"loss {name!r}: checks/reward_scale name unknown parameter(s) {unknown}")
        _REGISTRY[name] = entry
        return fn

    return wrap


def available_losses() -> list[str]:
    """Names accepted by :func:`get_loss`."""
    return sorted(_REGISTRY)


def loss_spec(name: str) -> LossSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def in_range(lo: float, hi: float, lo_closed: bool = True, hi_closed: bool = True) -> tuple[str, Callable]:
    """A parameter check for ``checks=``: ``in_range(0, 0.5, hi_closed=False)`` is ``0 <= x < 0.5``."""
    text = f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v >= lo if lo_closed else v > lo
        below = v <= hi if hi_closed else v < hi
        return above and below

    return f"a finite number in {text}", ok


def positive() -> tuple[str, Callable]:
    return in_range(0, math.inf, lo_closed=False)


def non_negative() -> tuple[str, Callable]:
    return in_range(0, math.inf)


def one_of(*choices: Any) -> tuple[str, Callable]:
    return f"one of {list(choices)}", lambda v: v in choices


def optional(check: tuple[str, Callable]) -> tuple[str, Callable]:
    text, ok = check
    return f"None or {text}", lambda v: v is None or ok(v)


@dataclass
class LossOutput:
    """One call's result. ``loss`` carries gradients; ``metrics`` are detached scalars."""

    loss: Tensor
    per_sample: Tensor
    rewards: Tensor
    metrics: dict[str, Tensor]


class PreferenceLoss:
    """A registered loss with bound parameters: ``get_loss("dpo", beta=0.1)(scores) -> LossOutput``."""

    def __init__(self, name: str, **params: Any):
        self.spec = loss_spec(name)
        defaults = self.spec.defaults
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(
                f"loss {name!r} got unknown parameter(s) {unknown}; its parameters are {sorted(defaults)}"
            )
        self.params = {**defaults, **params}
        for key, (text, ok) in self.spec.checks.items():
            if not ok(self.params[key]):
                raise ValueError(f"loss {name!r}: parameter {key}={self.params[key]!r} must be {text}")
        if self.spec.validate is not None:
            self.spec.validate(self.params)
        self.state: dict[str, Tensor] = {}

    name = property(lambda self: self.spec.name)

    @property
    def needs_reference(self) -> bool:
        n = self.spec.needs_reference
        return n(self.params) if callable(n) else n

    @property
    def needs_lengths(self) -> bool:
        n = self.spec.needs_lengths
        return n(self.params) if callable(n) else n

    @property
    def needs_kl(self) -> bool:
        return self.spec.needs_kl

    @property
    def unpaired(self) -> bool:
        return self.spec.data == "unpaired"

    @property
    def heads(self) -> tuple[str, ...]:
        """The registered losses this objective is made of (here: one)."""
        return (self.name,)

    @property
    def uses_losers(self) -> bool:
        """False for an additive term alone (e.g. an SFT phase): only the winners' scores are read."""
        return not self.spec.additive or self.needs_reference

    @property
    def additive(self) -> bool:
        return self.spec.additive

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"PreferenceLoss({self.name!r}, {args})"

    # ----- checkpointed state (bco's moving reward shift) ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = {k: v.detach().clone() for k, v in state.items()}

    # ----- the call -----------------------------------------------------------------------------------------------
    def __call__(self, scores: Scores) -> LossOutput:
        validate_scores(scores, self)
        view = ScoreView(scores)
        kwargs = dict(self.params)
        if self.spec.stateful:
            kwargs["state"] = self.state
        out = self.spec.fn(view, **kwargs)
        losses, extra = out if isinstance(out, tuple) else (out, {})
        if scores.log_weights is not None and not self.spec.additive:
            losses = losses * pair_weights(view, losses)
        per_sample = losses.mean(dim=1) if losses.dim() == 2 else losses  # K losers: mean over the K pairs
        rewards = self.rewards(view)
        metrics = reward_metrics(view, rewards)
        metrics.update({k: v.detach() for k, v in extra.items()})
        loss = per_sample.mean()
        metrics[f"loss/{self.name}"] = loss.detach()
        return LossOutput(loss=loss, per_sample=per_sample, rewards=rewards.detach(), metrics=metrics)

    def rewards(self, view: ScoreView) -> Tensor:
        kind = self.spec.reward(self.params) if callable(self.spec.reward) else self.spec.reward
        if view.scores.reference is None:
            # additive terms used alone (e.g. a pure SFT phase) report policy scores
            kind = {"ratio": "lp", "mean_ratio": "mean_lp"}.get(kind, kind)
        rs = self.spec.reward_scale
        scale = rs(self.params) if callable(rs) else self.params[rs] if rs else 1.0
        return scale * view.get(kind).detach()


def pair_weights(view: ScoreView, losses: Tensor) -> Tensor:
    """WPO's weights: ``exp(lw(y_w) + lw(y_lk))`` per pair for ``(B, K)`` losses, ``exp(sum_j lw(y_j))`` per group
    for ``(B,)`` ones (``lw`` = ``Scores.log_weights``, detached)."""
    lw = view.scores.log_weights.detach().to(view.dtype)
    return torch.exp(lw[:, :1] + lw[:, 1:]) if losses.dim() == 2 else torch.exp(lw.sum(1))


def reward_metrics(view: ScoreView, rewards: Tensor) -> dict[str, Tensor]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (ties 1/2) and logps."""
    s = view.scores
    lp = view.lp.detach()
    if s.grouped and rewards.shape[1] == 1:  # winners only (an SFT phase): nothing to compare
        return {"rewards/chosen": chosen(rewards).mean(), "logps/chosen": chosen(lp).mean()}
    if s.grouped:
        pair = margin(rewards)
        return {
            "rewards/chosen": chosen(rewards).mean(),
            "rewards/rejected": rejected(rewards).mean(),
            "rewards/margins": pair.mean(),
            "rewards/accuracies": ((pair > 0).to(pair.dtype) + 0.5 * (pair == 0).to(pair.dtype)).mean(),
            "logps/chosen": chosen(lp).mean(),
            "logps/rejected": rejected(lp).mean(),
        }
    desirable = view.labels
    nan = torch.tensor(float("nan"), dtype=rewards.dtype, device=rewards.device)
    mean_or_nan = lambda x: x.mean() if x.numel() else nan  # noqa: E731
    out = {
        "rewards/chosen": mean_or_nan(rewards[desirable]),
        "rewards/rejected": mean_or_nan(rewards[~desirable]),
        "logps/chosen": mean_or_nan(lp[desirable]),
        "logps/rejected": mean_or_nan(lp[~desirable]),
    }
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def tagged_metrics(rewards: Tensor, tags: Sequence[str | None]) -> dict[str, Tensor]:
    """``rewards/accuracies/<tag>`` and ``rewards/margins/<tag>`` over the groups of each tag (e.g. Audio-Alpaca's
    ``strategy``), from grouped rewards ``(B, 1+K)``; ties count 1/2. Groups without a tag are left out."""
    if rewards.dim() != 2 or rewards.shape[1] < 2 or len(tags) != rewards.shape[0]:
        return {}
    pair = margin(rewards.detach())
    won = (pair > 0).to(pair.dtype) + 0.5 * (pair == 0).to(pair.dtype)
    out = {}
    for tag in sorted({t for t in tags if t is not None}):
        rows = torch.tensor([t == tag for t in tags], device=pair.device)
        out[f"rewards/accuracies/{tag}"] = won[rows].mean()
        out[f"rewards/margins/{tag}"] = pair[rows].mean()
    return out


def validate_scores(scores: Scores, loss: PreferenceLoss) -> None:
    """Layout, shape, range and finiteness checks, each error naming the offending argument."""
    lp = scores.policy
    if not isinstance(lp, Tensor) or not lp.is_floating_point():
        raise TypeError(f"Scores.policy must be a floating-point tensor, got {_describe(lp)}")
    unpaired = scores.labels is not None
    if loss.spec.data == "unpaired" and not unpaired:
        raise ValueError(f"loss {loss.name!r} is unpaired: Scores.labels (B,) is required")
    if loss.spec.data == "grouped" and unpaired:
        raise ValueError(f"loss {loss.name!r} is grouped (B, 1+K): got unpaired Scores (Scores.labels is set)")
    if unpaired:
        labels = scores.labels
        if lp.dim() != 1 or not isinstance(labels, Tensor) or labels.shape != lp.shape:
            raise ValueError(
                f"loss {loss.name!r}: unpaired Scores.policy must be (B,) and Scores.labels the same shape; "
                f"got {tuple(lp.shape)} and {_describe(labels)}"
            )
        if labels.is_floating_point() or not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"Scores.labels must be bool (or 0/1 integers), got {labels.dtype} {labels.tolist()}")
    elif lp.dim() != 2 or lp.shape[1] < (1 if loss.spec.additive else 2):
        losers = "K >= 0" if loss.spec.additive else "K >= 1"
        raise ValueError(
            f"loss {loss.name!r}: Scores.policy must be (B, 1+K) with {losers} losers; got {tuple(lp.shape)}"
        )
    if loss.needs_reference and scores.reference is None:
        raise ValueError(f"loss {loss.name!r} needs reference scores: Scores.reference is None")
    if loss.needs_lengths and scores.lengths is None:
        raise ValueError(f"loss {loss.name!r} needs completion lengths: Scores.lengths is None")
    if loss.needs_kl and (scores.kl_policy is None or scores.kl_reference is None):
        raise ValueError(f"loss {loss.name!r} needs Scores.kl_policy and Scores.kl_reference")
    if scores.log_weights is not None and unpaired:
        raise ValueError("Scores.log_weights (WPO) are for grouped data only; got them with Scores.labels")
    for name in ("reference", "lengths", "win_prob", "weights", "log_weights"):
        t = getattr(scores, name)
        if t is not None and (not isinstance(t, Tensor) or t.shape != lp.shape):
            raise ValueError(f"Scores.{name} has shape {_describe(t)} but Scores.policy has {tuple(lp.shape)}")
    if scores.win_prob is not None and unpaired:
        raise ValueError("Scores.win_prob is for grouped data only; got it with Scores.labels")
    if scores.weights is not None and (not unpaired or (scores.weights.detach() < 0).any()):
        raise ValueError("Scores.weights are non-negative weights of unpaired rows (with Scores.labels)")
    kl = [getattr(scores, n) for n in ("kl_policy", "kl_reference")]
    if any(t is not None for t in kl):
        if any(not isinstance(t, Tensor) or t.dim() != 1 for t in kl) or kl[0].shape != kl[1].shape:
            raise ValueError(
                "Scores.kl_policy and Scores.kl_reference must both be given as (M,) tensors of one shape; "
                f"got {_describe(kl[0])} and {_describe(kl[1])}"
            )
    for name in ("policy", "reference", "lengths", "kl_policy", "kl_reference", "win_prob", "weights", "log_weights"):
        t = getattr(scores, name)
        if t is not None and not torch.isfinite(t.detach()).all():
            raise ValueError(f"Scores.{name} contains NaN or inf")
    if scores.lengths is not None and not (scores.lengths > 0).all():
        raise ValueError("Scores.lengths must be positive token counts")
    if scores.win_prob is not None and not ((scores.win_prob >= 0) & (scores.win_prob <= 1)).all():
        raise ValueError("Scores.win_prob must be probabilities in [0, 1]")


def _describe(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


class CombinedLoss:
    """A weighted sum of registered losses, e.g. RPO's paper form
    ``{"dpo": {"beta": 0.05}, "sft": {"eta": 0.005, "beta": 0.05}}``.

    Rewards and reward metrics come from the first preference (non-additive) term, or the first term when all are
    additive; every term adds its ``loss/<name>`` metric and its own extra metrics.
    """

    def __init__(self, terms: list[tuple[float, PreferenceLoss]]):
        if not terms:
            raise ValueError("a combined loss needs at least one term")
        kinds = {t.unpaired for _, t in terms if not t.additive}
        if len(kinds) > 1:
            raise ValueError("cannot combine paired and unpaired preference losses in one objective")
        for w, t in terms:
            if not _is_number(w) or w < 0:
                raise ValueError(f"loss.{t.name}.weight must be a finite number >= 0, got {w!r}")
        self.terms = terms

    @property
    def name(self) -> str:
        return "+".join(t.name for _, t in self.terms)

    needs_reference = property(lambda self: any(t.needs_reference for _, t in self.terms))
    needs_lengths = property(lambda self: any(t.needs_lengths for _, t in self.terms))
    needs_kl = property(lambda self: any(t.needs_kl for _, t in self.terms))
    unpaired = property(lambda self: any(t.unpaired for _, t in self.terms))
    heads = property(lambda self: tuple(t.name for _, t in self.terms))
    uses_losers = property(lambda self: any(t.uses_losers for _, t in self.terms))

    def __repr__(self) -> str:
        return " + ".join(f"{w}*{t!r}" for w, t in self.terms)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {f"{i}:{t.name}": t.state_dict() for i, (_, t) in enumerate(self.terms)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        for i, (_, t) in enumerate(self.terms):
            t.load_state_dict(state.get(f"{i}:{t.name}", {}))

    def __call__(self, scores: Scores) -> LossOutput:
        outs = [(w, t(scores)) for w, t in self.terms]
        lead = next((i for i, (_, t) in enumerate(self.terms) if not t.additive), 0)
        first = outs[lead][1]
        metrics = dict(first.metrics)
        for i, (_, o) in enumerate(outs):
            if i != lead:
                metrics.update({k: v for k, v in o.metrics.items() if k.startswith("loss/") or k not in metrics})
        loss = sum(w * o.loss for w, o in outs)
        per_sample = sum(w * o.per_sample for w, o in outs)
        metrics["loss"] = loss.detach()
        return LossOutput(loss=loss, per_sample=per_sample, rewards=first.rewards, metrics=metrics)


def get_loss(name: str, **params: Any) -> PreferenceLoss:
    """The registered loss ``name`` with parameters bound, e.g. ``get_loss("rdpo", beta=0.1, e=0.1)``."""
    return PreferenceLoss(name, **params)


def build_loss(spec: str | Mapping[str, Any]) -> CombinedLoss:
    """A loss from configuration.

    Accepted forms: ``"dpo"``; ``{"dpo": 1.0, "sft": 0.005}`` (weights); or
    ``{"dpo": {"weight": 1.0, "beta": 0.1}, "sft": {"weight": 0.005, "form": "sum"}}`` (weights and parameters).
    """
    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError(f"loss spec must be a name or a non-empty mapping of name -> weight/params, got {spec!r}")
    terms = []
    for name, value in spec.items():
        if isinstance(value, Mapping):
            params = dict(value)
            weight = params.pop("weight", 1.0)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            weight, params = value, {}
        else:
            raise TypeError(f"loss.{name}: expected a weight or a mapping of parameters, got {value!r}")
        if not _is_number(weight) or weight < 0:
            raise ValueError(f"loss.{name}.weight must be a finite number >= 0, got {weight!r}")
        try:
            terms.append((float(weight), get_loss(name, **params)))
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"loss.{name}: {e.args[0] if e.args else e}") from None
    return CombinedLoss(terms)
