"""Loading and validating preference data (llm.py: text)."""

from .llm import DataValidationError, LLMDataConfig, load_llm_data

__all__ = ["DataValidationError", "LLMDataConfig", "load_llm_data"]
