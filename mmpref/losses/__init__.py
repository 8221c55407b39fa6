"""The preference-loss core: per-sample scores in, losses, rewards and metrics out. Knows nothing of models.

The formulas, with their papers, are in ``docs/losses.md``. The loss modules below register themselves when this
package is imported (they import the registry; the registry imports none of them).
"""

from . import logic, pairwise, pointwise, regularisers  # noqa: F401  (registers the built-in losses)
from .registry import (
    CombinedLoss,
    LossOutput,
    PreferenceLoss,
    available_losses,
    build_loss,
    get_loss,
    loss_spec,
    register_loss,
    tagged_metrics,
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
    "tagged_metrics",
]
