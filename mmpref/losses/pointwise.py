"""Pointwise heads: each response scored on its own (formula sheet, "Pointwise heads")."""
