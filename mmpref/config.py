"""Typed run configuration: dataclasses loaded from YAML (``configs/*.yaml``) with ``key=value`` overrides.

The ``model:`` and ``data:`` sections are typed by the adapter named in ``modality`` (its ``model_config_class``
and ``data_config_class``). Unknown keys and bad values are errors that name the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the adapter's sensible default


@dataclass
class PhaseConfig:
    """One stage of a multi-stage recipe (e.g. an SFT epoch on winners, then DPO)."""

    name: str
    loss: Any  # a loss spec, see mmpref.losses.build_loss
    epochs: float | None = None
    max_steps: int | None = None


@dataclass
class OptimConfig:
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: str = "linear"  # linear | cosine | constant (all with linear warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0


@dataclass
class RunConfig:
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
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    report_to: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    cpu: bool = False  # force CPU (tests, CPU-only multi-process runs)


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
    train: RunConfig = field(default_factory=RunConfig)
