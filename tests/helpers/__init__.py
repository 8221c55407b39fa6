"""Shared test utilities (a toy adapter for engine tests)."""
