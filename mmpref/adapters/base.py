"""The adapter contract: an adapter owns one modality and turns a batch into the loss core's :class:`Scores`.

The training engine only ever calls the methods below; it knows neither the modality nor the loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from torch import nn

from mmpref.losses import Scores


class LossRequirements(Protocol):
    """What the current objective needs from the adapter (a PreferenceLoss or CombinedLoss satisfies this)."""

    needs_reference: bool
    needs_lengths: bool
    needs_kl: bool
    unpaired: bool


class Adapter(ABC):
    """Base class of the LLM and diffusion adapters.

    Lifecycle, as the engine drives it::

        adapter = AdapterClass(cfg)                     # cfg: the full TrainConfig; build models and datasets
        adapter.setup(accelerator, loss)                # move frozen parts, fill caches (reference scores, latents)
        policy = accelerator.prepare(adapter.policy)    # the engine owns the wrapped (DDP/FSDP) module
        for batch in DataLoader(adapter.train_dataset, collate_fn=adapter.collate, ...):
            scores = adapter.scores(policy, batch, loss)
            out = loss(scores)
        adapter.save_pretrained(accelerator.unwrap_model(policy), path)
    """

    name: ClassVar[str]
    model_config_class: ClassVar[type]  # dataclass for the config's `model:` section
    data_config_class: ClassVar[type]  # dataclass for the config's `data:` section

    policy: nn.Module  # the trainable module; must exist after __init__

    @property
    @abstractmethod
    def train_dataset(self) -> Any:
        """A map-style dataset (e.g. a ``datasets.Dataset``) of rows that :meth:`collate` batches."""

    @property
    def eval_dataset(self) -> Any | None:
        return None

    @abstractmethod
    def collate(self, rows: list[dict]) -> dict:
        """Rows -> a batch of tensors (on CPU; the engine's dataloader moves it to the device)."""

    def setup(self, accelerator: Any, loss: LossRequirements) -> None:  # noqa: B027 (optional hook)
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
