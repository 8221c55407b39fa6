"""From judged rollouts to preference groups: pure functions of rewards or preference probabilities.

Every builder works on ONE prompt's N samples and returns groups ``(members, win_prob)``: ``members`` are sample
indices, winner first (the offline layout: one winner, K losers), ``win_prob`` the soft labels for SPPO-style
losses or None for hard labels.

- :func:`best_vs_worst`: the highest reward against the lowest (online / iterative DPO).
- :func:`best_vs_k`: the highest against the K lowest (grouped sets, as offline).
- :func:`rso_accept` + :func:`pair_up`: RSO's statistical rejection sampling (Liu et al. 2023, arXiv 2309.06657,
  Algorithm 1): keep drawing from the not-yet-accepted pool, accepting a sample with probability
  ``exp((r - r_max) / beta)`` where ``r_max`` is the pool's highest reward, until M are accepted; the accepted
  samples then follow ``pi(y) * exp(r(y) / beta)`` (normalised) when N is large, and are paired in acceptance order.
- :func:`win_rates` + :func:`sppo_group`: SPPO (Wu et al. 2024, arXiv 2405.00675): each sample's win probability
  against the others, ``P_i = mean_{j != i} P(y_i beats y_j)``; the best and the worst, with those probabilities.
- :func:`labelled_pair`: two samples and ``P(a beats b)`` from a preference model (online IPO / IPO-MD).

Ties go to the lower sample index, so a builder is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Group = tuple[list[int], list[float] | None]


def _order(rewards: Tensor) -> list[int]:
    """Sample indices by reward, highest first; ties keep the lower index first."""
    r = rewards.tolist()
    return sorted(range(len(r)), key=lambda i: (-r[i], i))


def best_vs_worst(rewards: Tensor) -> list[Group]:
    order = _order(rewards)
    return [([order[0], order[-1]], None)]


def best_vs_k(rewards: Tensor, k: int) -> list[Group]:
    """The best sample against the ``k`` lowest-rewarded ones (lowest first)."""
    order = _order(rewards)
    if len(order) < k + 1:
        raise ValueError(f"best_vs_k needs at least {k + 1} samples, got {len(order)}")
    return [([order[0], *reversed(order[-k:])], None)]


def rso_accept(rewards: Tensor, beta: float, m: int, generator: torch.Generator) -> list[int]:
    """Indices of ``m`` samples accepted by statistical rejection sampling, in acceptance order (see module doc)."""
    if len(rewards) < m:
        raise ValueError(f"rso needs at least {m} samples to accept {m}, got {len(rewards)}")
    pool = list(range(len(rewards)))
    accepted: list[int] = []
    r = rewards.double()
    while len(accepted) < m:
        r_max = max(r[i] for i in pool)
        for j in torch.randperm(len(pool), generator=generator).tolist():
            i = pool[j]
            u = torch.rand((), generator=generator, dtype=torch.float64)
            if u < torch.exp((r[i] - r_max) / beta):
                accepted.append(i)
                if len(accepted) == m:
                    break
        pool = [i for i in pool if i not in accepted]
    return accepted


def pair_up(indices: list[int], rewards: Tensor) -> list[Group]:
    """Consecutive pairs of ``indices`` (RSO's first-round ranking), each as (higher reward, lower reward)."""
    out = []
    for a, b in zip(indices[0::2], indices[1::2]):
        win, lose = (a, b) if (rewards[a], -a) >= (rewards[b], -b) else (b, a)
        out.append(([win, lose], None))
    return out


def win_rates(prefer: Callable[[list[int], list[int]], Tensor], n: int) -> Tensor:
    """``P_i = mean_{j != i} P(y_i beats y_j)`` from a preference function over index lists, called once for all
    ``n (n - 1) / 2`` unordered pairs (``P(j beats i) = 1 - P(i beats j)``)."""
    a = [i for i in range(n) for j in range(i + 1, n)]
    b = [j for i in range(n) for j in range(i + 1, n)]
    p = prefer(a, b).double() if a else torch.zeros(0, dtype=torch.float64)
    matrix = torch.full((n, n), float("nan"), dtype=torch.float64)
    matrix[a, b] = p
    matrix[b, a] = 1 - p
    return matrix.nansum(dim=1) / max(n - 1, 1)


def sppo_group(rates: Tensor) -> list[Group]:
    """The best and the worst sample by win rate, with their win rates as soft labels."""
    order = _order(rates)
    best, worst = order[0], order[-1]
    return [([best, worst], [float(rates[best]), float(rates[worst])])]


def labelled_pair(p_a_beats_b: float) -> list[Group]:
    """Samples 0 and 1, the more preferred first, with the preference as soft labels."""
    if p_a_beats_b >= 0.5:
        return [([0, 1], [p_a_beats_b, 1 - p_a_beats_b])]
    return [([1, 0], [1 - p_a_beats_b, p_a_beats_b])]


def groups_per_prompt(builder: str, rso_accept_m: int) -> int:
    """How many groups a builder makes from one prompt's samples (fixed, so run lengths are known up front)."""
    return rso_accept_m // 2 if builder == "rso" else 1
