"""The one training loop shared by every modality: :func:`train` drives an adapter with a loss from the core."""

from .engine import TrainingError, TrainResult, train
from .phases import Phase, phase_at, plan_phases

__all__ = ["Phase", "TrainResult", "TrainingError", "phase_at", "plan_phases", "train"]
