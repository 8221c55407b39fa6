"""mmpref."""
