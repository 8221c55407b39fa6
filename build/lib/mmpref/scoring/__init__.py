"""Text-audio scorers for ranking synthetic preference candidates: CLAP (transformers) or any callable."""

from mmpref.scoring.clap import ClapScorer, Scorer, describe_scorer

__all__ = ["ClapScorer", "Scorer", "describe_scorer"]
