"""Synthetic audio preference data (Tango 2's Audio-Alpaca recipe): caption perturbation, Tango generation,
CLAP ranking and filtering, sharded and resumable. Entry points: :func:`run_synthesis` and ``mmpref synth``."""

from mmpref.synthesis.captions import CaptionParse, Event, parse_caption
from mmpref.synthesis.config import SynthConfig, load_synth_config
from mmpref.synthesis.filters import FilterThresholds, accept, filter_decisions
from mmpref.synthesis.perturb import LLMPerturber, Perturbation, RuleBasedPerturber, validate_perturbation
from mmpref.synthesis.run import SynthResult, run_synthesis
from mmpref.synthesis.vocabulary import Vocabulary

__all__ = [
    "CaptionParse",
    "Event",
    "FilterThresholds",
    "LLMPerturber",
    "Perturbation",
    "RuleBasedPerturber",
    "SynthConfig",
    "SynthResult",
    "Vocabulary",
    "accept",
    "filter_decisions",
    "load_synth_config",
    "parse_caption",
    "run_synthesis",
    "validate_perturbation",
]
