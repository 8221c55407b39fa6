"""Additive regularisers added to a preference head (formula sheet, "Additive regularisers")."""
