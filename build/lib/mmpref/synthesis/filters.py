"""Tango 2's preference filters, per scorer ``i``: winner >= alpha_i, loser >= beta_i, and the margin
(winner - loser) in [delta_min_i, delta_max_i]; plus ``wins``: the original caption's audio must score strictly
higher than the loser on every scorer. All bounds are inclusive, compared with a 1e-9 tolerance so that a
margin like 0.60 - 0.55 (0.04999... in floating point) counts as exactly on the 0.05 boundary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TOLERANCE = 1e-9


@dataclass(frozen=True)
class FilterThresholds:
    alpha: float = -1.0  # winner score >= alpha
    beta: float = -1.0  # loser score >= beta
    delta_min: float = 0.0  # margin >= delta_min
    delta_max: float = 2.0  # margin <= delta_max

    @classmethod
    def of(cls, cfg) -> FilterThresholds:
        return cls(cfg.alpha, cfg.beta, cfg.delta_min, cfg.delta_max)


def filter_names(scorers: list[str]) -> list[str]:
    """Every check :func:`filter_decisions` makes, in a fixed order (report columns)."""
    return ["wins"] + [f"{s}.{c}" for s in scorers for c in ("alpha", "beta", "delta_min", "delta_max")]


def filter_decisions(winner: Mapping[str, float], loser: Mapping[str, float],
                     thresholds: Mapping[str, FilterThresholds]) -> dict[str, bool]:
    """Pass/fail of each check for one (winner, loser) pair; ``winner``/``loser``: scorer name -> score."""
    out = {"wins": all(winner[s] - loser[s] > TOLERANCE for s in thresholds)}
    for s, t in thresholds.items():
        w, lo = winner[s], loser[s]
        margin = w - lo
        out[f"{s}.alpha"] = w >= t.alpha - TOLERANCE
        out[f"{s}.beta"] = lo >= t.beta - TOLERANCE
        out[f"{s}.delta_min"] = margin >= t.delta_min - TOLERANCE
        out[f"{s}.delta_max"] = margin <= t.delta_max + TOLERANCE
    return out


def accept(winner: Mapping[str, float], loser: Mapping[str, float],
           thresholds: Mapping[str, FilterThresholds]) -> bool:
    """True when the pair passes every check."""
    return all(filter_decisions(winner, loser, thresholds).values())
