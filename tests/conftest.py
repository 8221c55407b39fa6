"""Hermetic test runs: offline, and every cache (latents, tiny data sets, the demo's judge) in a fresh folder.

Without this, tests would read and write ``~/.cache/mmpref`` and a developer's machine would run a different
(faster, cached) suite than CI's clean checkout.
"""

import os
import shutil
import tempfile

import pytest


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config._mmpref_cache = tempfile.mkdtemp(prefix="mmpref-test-cache-")
    os.environ["MMPREF_CACHE_DIR"] = config._mmpref_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_mmpref_cache", ""), ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny runs: on a shared 2-core box oversubscribed OpenMP threads make them ~3x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
