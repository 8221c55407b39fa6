"""``SynthConfig``: the typed ``configs/synth_*.yaml`` for ``mmpref synth`` (same loader rules as training configs:
``defaults:`` includes, ``key.sub=value`` overrides, unknown keys are errors naming the file and the key)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmpref.errors import ConfigError
from mmpref.synthesis.perturb import STRATEGIES
from mmpref.yaml_config import build, load

AUDIO_FORMATS = ("flac", "wav")


@dataclass
class GenerationConfig:
    """How candidates are sampled.

    samples_per_caption: samples of the original caption with the ``resample`` strategy (the best by the first
        scorer is the winner of every strategy); without ``resample`` one sample is drawn.
    resample_steps: step counts of those samples (Tango 2: 5/25/50/100), cycled; None: all use ``steps``.
        Perturbed captions always use ``steps``. Every sample has its own seed derived from ``seed``, the caption's
        position in the captions file and the candidate's index, so shards and processes reproduce it exactly.
    shared_noise: perturbed captions are sampled with the seed of the original caption's first sample (the same
        starting noise), so a loser differs from its winner by what its caption changed rather than by the draw
        (common random numbers; Audio-Alpaca's generation code was not released, so its choice is unknown). With
        ``resample`` the winner may be another of the original's samples, from its own seed.
    """

    steps: int = 100
    guidance_scale: float = 3.0
    duration_s: float = 10.0
    batch_size: int = 8
    seed: int = 0
    samples_per_caption: int = 4
    resample_steps: list[int] | None = None
    shared_noise: bool = False


@dataclass
class LLMPerturbConfig:
    """An optional local causal LM that writes the perturbations (validated; rule-based fallback)."""

    path: str
    prompt: str | None = None
    max_new_tokens: int = 48
    temperature: float = 0.9
    num_samples: int = 8
    fallback_to_rules: bool = True


@dataclass
class PerturbConfig:
    # {category: [event phrases]}, a flat list of phrases, or a YAML/JSON file of either; None: the built-in one
    vocabulary: str | list[str] | dict[str, list[str]] | None = None
    max_perturbations: int = 5  # per caption and strategy (Tango 2: 5)
    seed: int = 0
    llm: LLMPerturbConfig | None = None


@dataclass
class ScorerConfig:
    """One scorer and its filter (Tango 2: winner >= alpha, loser >= beta, margin in [delta_min, delta_max]).

    path: a CLAP checkpoint folder, or ``preset:tiny`` (a random tiny CLAP, for tests)."""

    path: str
    alpha: float = -1.0
    beta: float = -1.0
    delta_min: float = 0.0
    delta_max: float = 2.0
    crop: str = "center"
    batch_size: int = 16


@dataclass
class SynthConfig:
    captions: str  # text file (one caption per line) or jsonl with a "caption" field
    output_dir: str = "runs/synth"
    pipeline: str = "preset:tiny"  # TangoPipeline / AudioLDM2Pipeline folder, or preset:<name>
    tokenizer: str | None = None  # local FLAN-T5 tokenizer: for preset:tango, or replacing a pipeline folder's
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    scorers: dict[str, ScorerConfig] = field(default_factory=dict)
    losers_per_prompt: int = 1  # K of a grouped.jsonl row
    shard_size: int = 64  # captions per shard
    audio_format: str = "flac"
    max_captions: int | None = None
    device: str | None = None  # None: accelerate's device for this process
    mixed_precision: str = "no"  # no | fp16 | bf16 (pipeline dtype)

    def validate(self) -> None:
        """Value checks; raise ValueError naming the key."""
        g = self.generation
        checks = [
            (all(s in STRATEGIES for s in self.strategies) and self.strategies,
             "strategies", f"a non-empty subset of {list(STRATEGIES)}"),
            (self.audio_format in AUDIO_FORMATS, "audio_format", f"one of {list(AUDIO_FORMATS)}"),
            (self.losers_per_prompt >= 1, "losers_per_prompt", ">= 1"),
            (self.shard_size >= 1, "shard_size", ">= 1"),
            (g.steps >= 1 and g.batch_size >= 1, "generation", "steps and batch_size >= 1"),
            (g.samples_per_caption >= 1, "generation.samples_per_caption", ">= 1"),
            ("resample" not in self.strategies or g.samples_per_caption >= 2, "generation.samples_per_caption",
             ">= 2 when strategies include resample (one winner, at least one loser)"),
            (g.duration_s > 0, "generation.duration_s", "> 0"),
            (bool(self.scorers), "scorers", "at least one scorer {name: {path: ...}}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "one of no, fp16, bf16"),
        ]
        for name, sc in self.scorers.items():
            checks.append((sc.delta_min <= sc.delta_max, f"scorers.{name}", "delta_min <= delta_max"))
        for ok, key, what in checks:
            if not ok:
                raise ValueError(f"{key}: must be {what}")


def load_synth_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SynthConfig:
    """Read a synth YAML (with ``defaults:`` and ``key=value`` overrides) into a checked :class:`SynthConfig`."""
    raw, overridden = load(path, overrides)
    return synth_config_from_dict(raw, source=str(path), overridden=overridden)


def synth_config_from_dict(raw: dict, source: str = "<dict>", overridden: dict | None = None) -> SynthConfig:
    cfg = build(SynthConfig, raw, source, overridden)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg
