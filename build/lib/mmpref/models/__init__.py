"""Model builders. Import submodules directly (``mmpref.models.tango``); this package imports nothing heavy."""
