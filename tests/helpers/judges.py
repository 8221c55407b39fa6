"""Rule-based judges for online tests (importable as ``helpers.judges:NAME`` in an ``online.judge`` section)."""

from __future__ import annotations

import numpy as np

CALLS: list[int] = []  # how many responses each call judged (tests read it)


def letter_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rewards answers with many of the letters a/e/i/o/u, a little less for length: something to learn."""
    CALLS.append(len(responses))
    return [sum(r.count(c) for c in "aeiou") - 0.05 * len(r) for r in responses]


def letter_preference(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
    """A preference model: Bradley-Terry over :func:`letter_reward`, written out."""
    ra, rb = np.array(letter_reward(prompts, a)), np.array(letter_reward(prompts, b))
    return list(1 / (1 + np.exp(-(ra - rb))))


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def short_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) - 1)


def wave_loudness(prompts: list[str], waves: list[np.ndarray]) -> list[float]:
    """An audio judge: the RMS level of each wave."""
    return [float(np.sqrt(np.mean(np.square(w)))) for w in waves]
