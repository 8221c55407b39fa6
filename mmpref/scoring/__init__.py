"""Text-audio scorers for ranking synthetic preference candidates (CLAP, or any callable)."""

from mmpref.scoring.clap import ClapScorer, Scorer, describe_scorer, make_tiny_clap, tiny_clap_parts, tiny_clap_scorer

__all__ = ["ClapScorer", "Scorer", "describe_scorer", "make_tiny_clap", "tiny_clap_parts", "tiny_clap_scorer"]
