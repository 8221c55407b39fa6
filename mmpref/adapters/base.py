"""The adapter contract: an adapter owns one modality and turns a batch into the loss core's :class:`Scores`.

The training engine only ever calls the methods below; it knows neither the modality nor the loss.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from mmpref.config import Objective, TrainConfig, build_objectives
from mmpref.errors import ConfigError
from mmpref.losses import Scores


class LossRequirements(Protocol):
    """What an objective asks of the adapter (a PreferenceLoss or CombinedLoss satisfies this)."""

    name: str
    heads: tuple[str, ...]  # the registered losses it is made of
    needs_reference: bool
    needs_lengths: bool
    needs_kl: bool
    unpaired: bool
    uses_losers: bool  # False for additive terms alone (an SFT phase reads the winners only)


class Adapter(ABC):
    """Base class of the LLM and diffusion adapters.

    Lifecycle, as the engine drives it::

        adapter = AdapterClass(cfg, objectives)         # models and datasets; refuses what it cannot serve
        adapter.setup(accelerator)                      # move frozen parts, fill caches (reference scores, latents)
        policy = accelerator.prepare(adapter.policy)    # the engine owns the wrapped (DDP/FSDP) module
        for batch in DataLoader(adapter.train_dataset, collate_fn=adapter.collate, ...):
            scores = adapter.scores(policy, batch, objective.loss)   # the current phase's loss
            out = objective.loss(scores)
        adapter.save_pretrained(accelerator.unwrap_model(policy), path)

    ``objectives`` are the run's phases' losses (:func:`mmpref.config.build_objectives`, built once by the engine;
    built from ``cfg`` when not given). The constructor calls :meth:`check_objectives` before loading anything
    heavy, so a recipe the adapter cannot serve fails at launch, naming the phase and the loss.
    """

    name: ClassVar[str]
    model_config_class: ClassVar[type]  # dataclass for the config's `model:` section
    data_config_class: ClassVar[type]  # dataclass for the config's `data:` section
    # reference.mode values this adapter cannot serve -> why (see resolve_reference)
    unsupported_reference_modes: ClassVar[Mapping[str, str]] = {}
    # whether a phase may name its own `data:` (then override phase_train_datasets / phase_eval_datasets)
    supports_phase_data: ClassVar[bool] = False

    policy: nn.Module  # the trainable module; must exist after __init__
    reference: nn.Module | None = None  # the frozen reference of reference.mode=copy

    def __init__(self, cfg: TrainConfig, objectives: Sequence[Objective] | None = None):
        self.cfg = cfg
        self.objectives = list(objectives) if objectives is not None else build_objectives(cfg)
        self.check_objectives(self.objectives)
        self.ref_mode = resolve_reference(cfg, self.objectives, self.unsupported_reference_modes)
        if not self.supports_phase_data:
            for i, p in enumerate(cfg.phases):
                if p.data is not None:
                    raise ConfigError(f"phases.{i}.data: the {self.name} adapter trains every phase on the run's "
                                      f"`data:`; remove phases.{i}.data")

    def check_objectives(self, objectives: Sequence[Objective]) -> None:
        """Refuse, naming the phase and the loss, any objective :meth:`cannot_serve` rejects."""
        for o in objectives:
            reason = self.cannot_serve(o.loss)
            if reason:
                raise ConfigError(f"{o.label}: the {self.name} adapter cannot serve it: {reason}")

    def cannot_serve(self, loss: LossRequirements) -> str | None:
        """Why this adapter cannot train ``loss`` (None: it can). Override per modality."""
        return None

    @property
    @abstractmethod
    def train_dataset(self) -> Any:
        """A map-style dataset (e.g. a ``datasets.Dataset``) of rows that :meth:`collate` batches."""

    @property
    def eval_dataset(self) -> Any | None:
        return None

    @property
    def phase_train_datasets(self) -> list[Any]:
        """One training dataset per objective (phase), in order; phases on the same data share one object, and
        the engine keeps one dataloader per object (its epochs continue from one phase to the next)."""
        return [self.train_dataset] * len(self.objectives)

    @property
    def phase_eval_datasets(self) -> list[Any | None]:
        """One evaluation dataset (or None) per objective, shared as :attr:`phase_train_datasets` are."""
        return [self.eval_dataset] * len(self.objectives)

    @abstractmethod
    def collate(self, rows: list[dict]) -> dict:
        """Rows -> a batch of tensors (on CPU; the engine's dataloader moves it to the device)."""

    def setup(self, accelerator: Any) -> None:  # noqa: B027 (optional hook)
        """Called once before training: place frozen models on ``accelerator.device``, build caches."""

    @abstractmethod
    def scores(self, policy: nn.Module, batch: dict, loss: LossRequirements) -> Scores:
        """Policy (and, when ``loss.needs_reference``, reference) scores for one batch."""

    def data_fingerprint(self) -> str:
        """A hash of the training data as this adapter read it ("" if unknown): a resumed run must see the same."""
        return ""

    def step_metrics(self) -> dict[str, float]:
        """Adapter-specific metrics of the last :meth:`scores` call (e.g. errors binned by timestep)."""
        return {}

    @abstractmethod
    def save_pretrained(self, policy: nn.Module, path: str) -> None:
        """Write the trained model (safetensors; adapters alone for LoRA) to ``path``."""

    def card_metadata(self) -> dict[str, Any]:
        """What the model card says about this modality's output (:func:`mmpref.training.hub.model_card`):
        ``library_name``, ``base_model``, ``pipeline_tag``, ``tags``, ``usage`` (code that loads ``final/``)."""
        return {}

    # ----- the reference as training goes on ----------------------------------------------------------------------
    def reference_state(self) -> dict[str, Tensor]:
        """The frozen reference's weights (``copy`` mode), on CPU: what a run keeps to restore it on resume."""
        return {k: v.detach().cpu().contiguous() for k, v in self.reference.state_dict().items()}

    def set_reference(self, policy: nn.Module | None = None, state: dict[str, Tensor] | None = None) -> None:
        """The frozen reference becomes the current policy (or ``state``): SPPO's previous iterate, iterative
        Tango 2's previous round. With LoRA the policy's adapter is folded into the weights copied."""
        if state is None:
            from .lora import merged_weights

            model = unwrap(policy)
            state = merged_weights(model) if self.cfg.lora.enabled else \
                {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.reference.load_state_dict(state)

    def reference_from_policy(self, policy: nn.Module, seed: int) -> dict[str, Tensor] | None:
        """``reference.from_phase_start``: the reference becomes the policy as it is now. ``copy``: the frozen copy
        takes the policy's weights; returns them, for the run to keep. ``lora``: the adapter is folded into the
        base weights and starts afresh (drawn from ``seed``), so the adapter-disabled policy is the policy as it
        is now; returns None (the policy's own checkpoint holds the folded weights)."""
        if self.ref_mode == "lora":
            from .lora import fold_lora

            fold_lora(unwrap(policy), seed)
            return None
        self.set_reference(policy)
        return self.reference_state()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def resolve_reference(cfg: TrainConfig, objectives: Sequence[Objective],
                      unsupported: Mapping[str, str] = {}) -> str:  # noqa: B006 - read only
    """The reference a run uses: ``"none"`` when no objective needs one (nothing is loaded or copied, whatever
    ``reference.mode`` says); otherwise ``reference.mode``, checked against what the objectives and the adapter
    need. Both adapters call this; errors name the key and the phase that needs a reference."""
    needing = [o for o in objectives if o.loss.needs_reference or o.loss.needs_kl]
    if not needing:
        return "none"
    ref, first = cfg.reference, needing[0]
    what = "a reference model" if first.loss.needs_reference else "a reference model (for its KL samples)"
    if ref.mode == "none":
        raise ConfigError(f"reference.mode=none, but {first.label} needs {what}; set reference.mode to copy or lora")
    if ref.mode in unsupported:
        raise ConfigError(f"reference.mode={ref.mode}: {unsupported[ref.mode]}")
    if ref.mode == "lora" and not cfg.lora.enabled:
        raise ConfigError("reference.mode=lora needs lora.enabled=true (the reference is the policy with its LoRA "
                          "adapter disabled)")
    if ref.from_phase_start and ref.mode == "cached":
        raise ConfigError("reference.from_phase_start needs a reference that can change during the run: "
                          "reference.mode=cached computes it once, before training; use copy or lora")
    if ref.from_phase_start and cfg.online is not None:
        raise ConfigError("reference.from_phase_start is for offline phases; an online run moves its reference "
                          "with online.update_reference")
    if ref.mode == "lora" and (ref.path or ref.dtype):
        raise ConfigError("reference.mode=lora shares the policy's weights: reference.path and reference.dtype "
                          "must be unset")
    return ref.mode


def local_main_process() -> bool:
    """True on the process that draws progress bars (LOCAL_RANK 0, or no launcher at all)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"
