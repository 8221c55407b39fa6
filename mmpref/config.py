"""Typed run configuration: dataclasses loaded from YAML (``configs/*.yaml``) with ``key=value`` overrides.

The ``model:`` and ``data:`` sections are typed by the adapter named in ``modality`` (its ``model_config_class``
and ``data_config_class``, found through :mod:`mmpref.modalities`). Files, includes, overrides and type errors
follow :mod:`mmpref.yaml_config`: unknown keys and bad values are errors that name the file and the dotted key.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from mmpref.errors import ConfigError
from mmpref.io import write_text_atomic
from mmpref.modalities import get_adapter_class
from mmpref.yaml_config import build, check, dump_yaml, load, where

REFERENCE_MODES = ("copy", "lora", "cached", "none")
SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class ReferenceConfig:
    """Where reference scores come from.

    mode: ``copy`` (a separate frozen model), ``lora`` (the policy with its LoRA adapter disabled: one copy of the
    weights), ``cached`` (precomputed once over the dataset, stored on disk), ``none`` (reference-free losses).
    """

    mode: str = "copy"
    dtype: str | None = None  # e.g. "bfloat16" for a lighter frozen copy; None keeps the policy's dtype
    path: str | None = None  # a different reference checkpoint; None means the policy's starting weights
    cache_dir: str | None = None  # for mode=cached; default <output_dir>/reference_cache
    # true: every phase after the first compares against the policy as the previous phase ended (OpenBezoar: DPO
    # against the SFT result; with lora the SFT adapter is folded into the base and a fresh adapter trains on);
    # false: the starting model throughout (Tango 2)
    from_phase_start: bool = False

    def __post_init__(self) -> None:
        check(self.mode in REFERENCE_MODES, "mode", f"must be one of {', '.join(REFERENCE_MODES)}; got {self.mode!r}")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the adapter's sensible default

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", f"must be >= 1; got {self.r}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1); got {self.dropout}")


@dataclass
class PhaseConfig:
    """One stage of a multi-stage recipe (e.g. an SFT epoch on winners, then DPO)."""

    name: str
    loss: Any  # a loss spec, see mmpref.losses.build_loss
    epochs: float | None = None
    max_steps: int | None = None
    # this phase's own data (e.g. instruction data for SFT before DPO on preferences): keys over the run's `data:`
    # section, which fills the rest; typed as the adapter's data section when the config is read. None: `data:`.
    data: Any = None

    def __post_init__(self) -> None:
        check(not (self.epochs is not None and self.max_steps is not None), "epochs", "give `epochs` or "
              "`max_steps`, not both")
        check(self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0), "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0")


@dataclass
class OptimConfig:
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: str = "linear"  # linear | cosine | constant (all with linear warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number (e.g. 1e-5); got {self.lr}")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
              f"must be two numbers in [0, 1); got {self.betas}")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}; "
              f"got {self.scheduler!r}")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null (no "
              "clipping)")


@dataclass
class RunConfig:
    """The ``run:`` section: how the run is driven (batches, steps, precision, logging, checkpoints, folders).

    output_dir: the run's folder. A new run needs an empty or new folder; a folder holding an mmpref run is resumed
        (``resume: true``, the default: the saved config must match, see :mod:`mmpref.training.run_folder`) or
        started over (``overwrite: true``: only the files that run wrote are removed).
    """

    output_dir: str = "runs/default"
    batch_size: int = 4  # per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    save_every: int = 500  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    eval_every: int | None = None
    num_workers: int = 0
    resume: bool = True  # continue the run in output_dir from its newest intact checkpoint
    overwrite: bool = False  # start over in an output_dir that holds an earlier run (its files only are removed)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    cpu: bool = False  # force CPU (tests, CPU-only multi-process runs)
    # LoRA runs: final/ holds the adapter merged into the base, a full model that loads with no peft and no base
    # path (the adapter alone goes to final/adapter/); without it final/ holds the adapter alone
    merge_lora: bool = False
    # upload final/ (with its model card, README.md) to the Hugging Face Hub at the end of the run; the token is
    # checked at launch. Repositories are created private unless hub_private is false.
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "owner/name" (or "name" under your account)
    hub_private: bool = True

    def __post_init__(self) -> None:
        check(bool(self.output_dir), "output_dir", "required")
        check(not self.push_to_hub or bool(self.hub_model_id), "hub_model_id",
              "required with push_to_hub: the repository to upload to, e.g. my-org/my-model")
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, f"must be >= 1; got {getattr(self, name)}")
        check(math.isfinite(self.epochs) and self.epochs > 0, "epochs", f"must be > 0; got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        check(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be >= 1 or null (no evaluation)")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
              f"must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision!r}")


JUDGE_KINDS = ("reward_model", "callable", "clap")


@dataclass
class JudgeConfig:
    """The ``online.judge`` section.

    kind: ``reward_model`` (a transformers sequence classifier folder or hub id with one output), ``callable``
        (``path: module:function``, called as ``fn(prompts, responses) -> rewards`` or, with ``preference: true``,
        ``fn(prompts, a, b) -> P(a beats b)``), or ``clap`` (a CLAP folder, or ``preset:tiny``; audio only).
    preference: the callable returns preference probabilities instead of rewards.
    """

    kind: str = "reward_model"
    path: str = ""
    preference: bool = False
    batch_size: int = 16
    dtype: str = "float32"
    max_length: int = 512  # reward model: tokens of prompt + response

    def __post_init__(self) -> None:
        check(self.kind in JUDGE_KINDS, "kind", f"must be one of {', '.join(JUDGE_KINDS)}; got {self.kind!r}")
        check(bool(self.path), "path", "required: a model folder, a hub id, module:function or preset:tiny")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(not self.preference or self.kind == "callable", "preference", "only a callable judge returns "
              "preference probabilities; reward models are turned into preferences by Bradley-Terry")


ONLINE_SCHEDULES = ("step", "round")
BUILDERS = ("best_vs_worst", "best_vs_k", "rso", "sppo", "pair")


@dataclass
class RolloutConfig:
    """How the policy samples during online training (``online.generation``).

    LLM: ``max_new_tokens``, ``temperature``, ``top_p``; ``mixture`` > 0 samples from the token-level geometric
    mixture ``(1 - mixture) * log pi + mixture * log ref`` (IPO-MD / Nash-MD; 0.125 in the paper).
    Diffusion: ``steps`` and ``guidance_scale`` of the pipeline's sampler.
    prompts_per_batch: prompts sampled together (with their N samples each). Which prompts share a batch is fixed by
        their positions in the prompt stream, so runs reproduce exactly across resumes, and across process counts
        when this divides ``run.batch_size`` (the step schedule uses their greatest common divisor).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    mixture: float = 0.0
    steps: int = 50
    guidance_scale: float = 3.0
    prompts_per_batch: int = 8

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.prompts_per_batch >= 1, "prompts_per_batch", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(0 <= self.mixture < 1, "mixture", "must be in [0, 1)")
        check(self.steps >= 1, "steps", "must be >= 1")


@dataclass
class RSOConfig:
    """RSO's statistical rejection sampling: accept ``u < exp((r - r_max) / beta)`` until ``accept`` are kept."""

    beta: float = 0.5
    accept: int = 8

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", "must be > 0")
        check(self.accept >= 2 and self.accept % 2 == 0, "accept", "must be an even number >= 2 (pairs are made)")


@dataclass
class OnlineConfig:
    """The ``online:`` section: train on the policy's own samples, judged as they are drawn.

    schedule: ``step`` (fresh rollouts for every optimizer step: online DPO, online IPO / IPO-MD; the run lasts
        ``run.max_steps``) or ``round`` (a round samples for ``prompts_per_round`` prompts, saves the judged
        rollouts, trains ``epochs_per_round`` epochs on them, and, with ``update_reference``, makes the policy the
        next round's reference: SPPO, iterative DPO, iterative Tango 2).
    prompts: a file of prompts (JSON/JSONL/CSV/Parquet with ``prompt_column``, or text with one per line).
    samples: N responses per prompt. builder: how groups are made from them (``best_vs_worst``; ``best_vs_k``:
        the best against the ``losers`` lowest; ``rso``: statistical rejection sampling then pairs; ``sppo``: the
        best and the worst with their win probabilities as soft labels; ``pair``: two samples labelled by the
        preference model, IPO-style).
    """

    prompts: str = ""
    prompt_column: str = "prompt"
    schedule: str = "step"
    samples: int = 2
    builder: str = "best_vs_worst"
    losers: int = 1
    judge: JudgeConfig | None = None
    generation: RolloutConfig = field(default_factory=RolloutConfig)
    rso: RSOConfig = field(default_factory=RSOConfig)
    rounds: int = 1
    prompts_per_round: int = 64
    epochs_per_round: float = 1.0
    update_reference: bool = False

    def __post_init__(self) -> None:
        check(bool(self.prompts), "prompts", "required: a file of prompts for the policy to answer")
        check(self.judge is not None, "judge", "required: {kind: reward_model | callable | clap, path: ...}")
        check(self.schedule in ONLINE_SCHEDULES, "schedule", f"must be one of {', '.join(ONLINE_SCHEDULES)}")
        check(self.builder in BUILDERS, "builder", f"must be one of {', '.join(BUILDERS)}; got {self.builder!r}")
        check(self.losers >= 1, "losers", "must be >= 1")
        need = {"best_vs_worst": 2, "best_vs_k": self.losers + 1, "rso": self.rso.accept, "sppo": 2,
                "pair": 2}[self.builder]
        check(self.samples >= need, "samples", f"must be >= {need} for builder {self.builder!r} (got {self.samples})")
        check(self.builder != "pair" or self.samples == 2, "samples", "builder 'pair' labels exactly 2 samples")
        check(self.rounds >= 1 and self.prompts_per_round >= 1, "rounds", "rounds and prompts_per_round must be >= 1")
        check(self.epochs_per_round > 0, "epochs_per_round", "must be > 0")
        check(self.schedule == "round" or not self.update_reference, "update_reference",
              "needs schedule: round (the reference moves at round boundaries)")


@dataclass
class TrainConfig:
    modality: str
    model: Any  # adapter.model_config_class instance
    data: Any  # adapter.data_config_class instance
    loss: Any = None  # single objective; or use phases
    phases: list[PhaseConfig] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    online: OnlineConfig | None = None  # train on the policy's own samples (see OnlineConfig)


# ----- loading ------------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML, optionally with ``defaults: [base.yaml, ...]``), apply ``key.sub=value`` overrides, type it.

    Values are read as in :mod:`mmpref.yaml_config` (``optim.lr=1e-5`` is a float, ``loss={dpo: {beta: 0.2}}`` a
    mapping); list items are addressed by index (``phases.1.epochs=2``).
    """
    raw, overridden = load(path, overrides)
    return config_from_dict(raw, source=str(path), overridden=overridden)


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>", overridden: Mapping[str, str] = ()) -> TrainConfig:
    """Type a plain dict (as read from YAML) into a :class:`TrainConfig`; errors name ``source`` and the key."""
    overridden = dict(overridden)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    raw, overridden = _renamed_train_section(dict(raw), overridden, source)
    modality = raw.get("modality")
    if not isinstance(modality, str):
        raise ConfigError(f"{where(source, 'modality', overridden)}: required, a string naming the adapter "
                          "(e.g. llm, diffusion)")
    try:
        adapter = get_adapter_class(modality)
    except (KeyError, ImportError) as e:
        raise ConfigError(f"{where(source, 'modality', overridden)}: {e.args[0] if e.args else e}") from None
    hints = {**typing.get_type_hints(TrainConfig), "model": adapter.model_config_class,
             "data": adapter.data_config_class}
    cfg = build(TrainConfig, dict(raw), source, overridden, hints=hints)
    for i, phase in enumerate(cfg.phases):
        if phase.data is not None:  # the phase's keys over the run's data section
            phase.data = build(adapter.data_config_class, phase.data, source, overridden, key=f"phases.{i}.data",
                               default=cfg.data)
    _check_objective(cfg, lambda key: where(source, key, overridden))
    return cfg


@dataclass(frozen=True)
class Objective:
    """One phase's loss, built from the config: what the adapter must serve while that phase runs.

    ``loss`` is a :class:`mmpref.losses.CombinedLoss` (``needs_reference``, ``needs_lengths``, ``needs_kl``,
    ``unpaired``, ``uses_losers``, ``heads``); ``key`` says where it is in the config, for error messages.
    """

    phase: str  # the phase's name ("train" for a single `loss:`)
    key: str  # "loss" or "phases.<i>.loss"
    loss: Any

    @property
    def label(self) -> str:
        """``phases.1.loss (phase 'dpo', loss 'kto')``: how errors name it."""
        return f"{self.key} (phase {self.phase!r}, loss {self.loss.name!r})"


def build_objectives(cfg: TrainConfig, at: typing.Callable[[str], str] = lambda key: key) -> list[Objective]:
    """The run's objectives, one per phase (one named ``train`` for a single ``loss``); the only place they are
    built. Errors are :class:`ConfigError` naming the key (``at`` adds the file)."""
    from mmpref.losses import build_loss

    if (cfg.loss is None) == (not cfg.phases):
        raise ConfigError(f"{at('loss')}: give exactly one of `loss` (one objective) or `phases` (a recipe)")
    specs = ([("train", "loss", cfg.loss)] if cfg.loss is not None
             else [(p.name, f"phases.{i}.loss", p.loss) for i, p in enumerate(cfg.phases)])
    out = []
    for phase, key, spec in specs:
        try:
            out.append(Objective(phase, key, build_loss(spec)))
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{at(key)}: {e.args[0] if e.args else e}") from None
    return out


def _renamed_train_section(raw: dict, overridden: dict[str, str], source: str) -> tuple[dict, dict[str, str]]:
    """Configs written before mmpref 0.2 call the ``run:`` section ``train:`` (a name that also meant the
    ``train()`` function): read it as ``run:``, once, with a notice."""
    if "train" not in raw:
        return raw, overridden
    print(f"mmpref: note: {source}: the `train:` section is now called `run:`; read as `run:`")
    old = raw.pop("train")
    raw["run"] = {**raw["run"], **old} if isinstance(raw.get("run"), dict) and isinstance(old, dict) else old
    renamed = {("run" + k[5:] if k == "train" or k.startswith("train.") else k): v for k, v in overridden.items()}
    return raw, renamed


def _check_objective(cfg: TrainConfig, at: typing.Callable[[str], str]) -> None:
    """Every loss spec builds (:func:`build_objectives`); only the last phase may be open-ended."""
    build_objectives(cfg, at)
    for i, p in enumerate(cfg.phases[:-1]):
        if p.epochs is None and p.max_steps is None:
            raise ConfigError(f"{at(f'phases.{i}')}: only the last phase may omit `epochs`/`max_steps`")


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts/lists (YAML-safe) from a config; the inverse of :func:`config_from_dict`."""
    return asdict(cfg) if is_dataclass(cfg) else cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so a run records exactly what it trained with."""
    write_text_atomic(path, dump_yaml(config_to_dict(cfg)))
