"""The public API: every re-exported name resolves, and ``import mmpref`` stays light."""

import importlib
import inspect
import subprocess
import sys

import pytest

import mmpref


@pytest.mark.parametrize("name", mmpref.__all__)
def test_every_export_resolves_to_its_definition(name):
    """``mmpref.X`` is the very class or function its module exports, defined in the package under that name."""
    value = getattr(mmpref, name)
    assert value is getattr(importlib.import_module(mmpref._EXPORTS[name]), name)
    assert inspect.isclass(value) or inspect.isfunction(value), f"{name} is a {type(value).__name__}"
    assert value.__name__ == name and value.__module__.startswith("mmpref.")


def test_import_is_light_and_unknown_names_fail():
    code = "import sys, mmpref; print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"] * 2
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmpref.nope  # noqa: B018
