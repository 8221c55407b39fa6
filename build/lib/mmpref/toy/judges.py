"""Rule-based judges for the tiny recipes: the toy preference rule (animals good, tools bad) as a reward and as a
preference model, named in a config as ``mmpref.toy.judges:animal_reward`` (a callable judge)."""

from __future__ import annotations

import math

from mmpref.toy.llm import BAD_WORDS, GOOD_WORDS


def animal_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Animal words minus tool words in each response (what :func:`mmpref.toy.llm.synthetic_preferences` prefers)."""
    out = []
    for r in responses:
        words = r.split()
        out.append(float(sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words)))
    return out


def animal_preference(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
    """``P(a beats b) = sigmoid(reward(a) - reward(b))``: the Bradley-Terry model of :func:`animal_reward`."""
    return [1 / (1 + math.exp(rb - ra)) for ra, rb in zip(animal_reward(prompts, a), animal_reward(prompts, b))]
