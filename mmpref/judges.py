"""Judges for online training: what labels the policy's own samples.

Two kinds, one small interface each:

- a **reward model**: ``rewards(prompts, responses) -> (N,)`` scores, one per (prompt, response);
- a **preference model**: ``prefer(prompts, a, b) -> (N,)`` probabilities that ``a`` beats ``b``.

Built-ins: a transformers ``AutoModelForSequenceClassification`` with one output (:class:`SequenceClassifierReward`),
any Python callable named ``module:function`` (:class:`CallableJudge`), Bradley-Terry preferences from any reward
model (:class:`BradleyTerry`: ``sigmoid(r_a - r_b)``), and for audio any :class:`mmpref.scoring.Scorer` such as
CLAP (:class:`ScorerReward`; responses are waves). Every judge runs batched, without gradients, on its own device
and dtype; every output is checked (shape, finiteness, probabilities in [0, 1]) and a bad one is a
:class:`~mmpref.errors.DataError` naming the judge.

``responses`` are whatever the adapter's rollouts are made of: decoded texts for the LLM adapter, float waves for
the diffusion adapter. :func:`build_judge` makes one from the config's ``online.judge`` section.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mmpref.config import JudgeConfig
from mmpref.errors import ConfigError, DataError
from mmpref.sources import check_source, loading


@runtime_checkable
class RewardModel(Protocol):
    name: str

    def rewards(self, prompts: Sequence[str], responses: Sequence[Any]) -> torch.Tensor: ...


@runtime_checkable
class PreferenceModel(Protocol):
    name: str

    def prefer(self, prompts: Sequence[str], a: Sequence[Any], b: Sequence[Any]) -> torch.Tensor: ...


# ----- output checks ------------------------------------------------------------------------------------------------
def checked(values: Any, n: int, judge: str, probabilities: bool = False) -> torch.Tensor:
    """``values`` as a float32 CPU tensor of shape (n,), or a DataError naming ``judge``."""
    try:
        t = torch.as_tensor(np.asarray(values.detach().cpu() if torch.is_tensor(values) else values,
                                       dtype=np.float64)).float().reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"judge {judge!r} returned {type(values).__name__}, not numbers ({e})") from None
    if t.shape != (n,):
        raise DataError(f"judge {judge!r} returned {t.numel()} values for {n} responses; it must return one per "
                        "response")
    if not torch.isfinite(t).all():
        i = int((~torch.isfinite(t)).nonzero()[0])
        raise DataError(f"judge {judge!r} returned {t[i].item()} for response {i}; judges must return finite numbers")
    if probabilities and ((t < 0) | (t > 1)).any():
        raise DataError(f"judge {judge!r} returned a preference outside [0, 1] ({t.min().item():.3g} .. "
                        f"{t.max().item():.3g}); it must return P(a beats b)")
    return t


# ----- built-ins ----------------------------------------------------------------------------------------------------
def reward_text(tokenizer: Any, prompt: str, response: str) -> str:
    """What a sequence-classifier reward model reads for one (prompt, response): the conversation rendered with the
    tokenizer's chat template when it has one (as TRL's reward models are trained), else ``prompt + response``.
    Train a reward model on the same rendering it is scored with."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    return prompt + response


class SequenceClassifierReward:
    """A reward model: ``AutoModelForSequenceClassification`` with one output, scoring ``prompt + response``
    (rendered with the tokenizer's chat template when it has one, as TRL's reward models are trained)."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: str = "float32", batch_size: int = 16,
                 max_length: int = 512, key: str = "online.judge.path"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_source(path, key, "a sequence-classification reward model folder or hub id")
        with loading(key, path, "a reward model (AutoModelForSequenceClassification)"):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=getattr(torch, dtype), output_loading_info=True)
        fresh = [k for k in info.get("missing_keys", ()) if "score" in k or "classifier" in k]
        if fresh:
            raise ConfigError(f"{key}: {path!r} has no trained score head ({', '.join(sorted(fresh)[:2])} would be "
                              "random); give a reward model trained as a sequence classifier with one output")
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{key}: {path!r} has {self.model.config.num_labels} outputs; a reward model has one "
                              "score head (num_labels=1)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.max_length, self.name = torch.device(device), batch_size, max_length, path

    @torch.no_grad()
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            texts = [reward_text(self.tokenizer, p, r)
                     for p, r in zip(prompts[s:s + self.batch_size], responses[s:s + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return checked(torch.cat(out) if out else torch.zeros(0), len(prompts), self.name)


class CallableJudge:
    """Any function: ``fn(prompts, responses) -> rewards`` or, as a preference model, ``fn(prompts, a, b)``."""

    def __init__(self, fn: Callable[..., Any], name: str, preference: bool = False):
        self.fn, self.name, self.is_preference = fn, name, preference

    @classmethod
    def from_path(cls, spec: str, preference: bool = False, key: str = "online.judge.path") -> CallableJudge:
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise ConfigError(f"{key}: {spec!r} must name a function as module:function (e.g. my_rewards:score)")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{key}: cannot import {spec!r} ({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise ConfigError(f"{key}: {spec!r} is not callable")
        return cls(fn, spec, preference)

    def rewards(self, prompts: Sequence[str], responses: Sequence[Any]) -> torch.Tensor:
        return checked(self.fn(list(prompts), list(responses)), len(prompts), self.name)

    def prefer(self, prompts: Sequence[str], a: Sequence[Any], b: Sequence[Any]) -> torch.Tensor:
        return checked(self.fn(list(prompts), list(a), list(b)), len(prompts), self.name, probabilities=True)


class BradleyTerry:
    """A preference model from any reward model: ``P(a beats b) = sigmoid(r(a) - r(b))``."""

    def __init__(self, reward: RewardModel):
        self.reward, self.name = reward, f"bradley-terry({reward.name})"

    def prefer(self, prompts: Sequence[str], a: Sequence[Any], b: Sequence[Any]) -> torch.Tensor:
        n = len(prompts)
        r = self.reward.rewards(list(prompts) * 2, list(a) + list(b))
        return torch.sigmoid(r[:n] - r[n:])


class ScorerReward:
    """Any audio :class:`~mmpref.scoring.Scorer` (``scorer(texts, waves, sample_rate)``), e.g. CLAP, as a reward
    model whose responses are waves."""

    def __init__(self, scorer: Any, sample_rate: int, name: str):
        self.scorer, self.sample_rate, self.name = scorer, sample_rate, name

    def rewards(self, prompts: Sequence[str], responses: Sequence[np.ndarray]) -> torch.Tensor:
        return checked(self.scorer(list(prompts), list(responses), self.sample_rate), len(prompts), self.name)


def build_judge(cfg: JudgeConfig, device: str | torch.device = "cpu", sample_rate: int = 16000) -> Any:
    """The judge of ``online.judge`` (a reward model, or a preference model for ``callable`` + ``preference``)."""
    if cfg.kind == "reward_model":
        return SequenceClassifierReward(cfg.path, device, cfg.dtype, cfg.batch_size, cfg.max_length)
    if cfg.kind == "callable":
        return CallableJudge.from_path(cfg.path, cfg.preference)
    from mmpref.scoring import ClapScorer

    if cfg.path.startswith("preset:tiny"):
        from mmpref.toy.clap import tiny_clap_scorer

        scorer = tiny_clap_scorer(0, device=device, batch_size=cfg.batch_size)
    else:
        check_source(cfg.path, "online.judge.path", "a CLAP checkpoint folder or preset:tiny")
        with loading("online.judge.path", cfg.path, "a CLAP checkpoint"):
            scorer = ClapScorer(cfg.path, device=device, batch_size=cfg.batch_size)
    return ScorerReward(scorer, sample_rate, cfg.path)


def as_preference(judge: Any) -> PreferenceModel:
    """A preference model from any judge: itself if it is one, else Bradley-Terry over its rewards."""
    return judge if is_preference_model(judge) else BradleyTerry(judge)


def is_preference_model(judge: Any) -> bool:
    """True for judges that compare two responses (and cannot score one alone)."""
    return bool(getattr(judge, "is_preference", False)) or not hasattr(judge, "rewards")
