"""The preference-loss core: per-sample scores in, losses, rewards and metrics out. Knows nothing of models."""

from .registry import (
    CombinedLoss,
    LossOutput,
    PreferenceLoss,
    available_losses,
    build_loss,
    get_loss,
    loss_spec,
    register_loss,
)
from .scores import Scores, ScoreView

__all__ = [
    "CombinedLoss",
    "LossOutput",
    "PreferenceLoss",
    "ScoreView",
    "Scores",
    "available_losses",
    "build_loss",
    "get_loss",
    "loss_spec",
    "register_loss",
]
