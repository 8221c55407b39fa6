"""The engine with precomputed reference log-probs: setup() adds the cache columns before the dataloader is built.

Regression test: the engine used to build its DataLoader before ``adapter.setup``, so batches came from the dataset
without the ``ref`` column and a ``reference.mode=cached`` run failed at step 1 with ``KeyError: 'ref'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpref.config import config_from_dict
from mmpref.toy.llm import build_tiny_llama, synthetic_preferences
from mmpref.training import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llm_cached")
    rows = synthetic_preferences(8, seed=3)
    model = build_tiny_llama(root / "model", [r["prompt"] + r["chosen"] + r["rejected"] for r in rows] * 4, 320)
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": str(model), "data": str(data), "root": str(root)}


def run(assets: dict[str, str], mode: str) -> list[float]:
    raw = {
        "modality": "llm",
        "model": {"path": assets["model"]},
        "data": {"path": assets["data"], "max_length": 64},
        "reference": {"mode": mode},
        "loss": {"dpo": {"beta": 0.1}},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "run": {"batch_size": 4, "max_steps": 3, "cpu": True, "log_every": 1, "resume": False,
                  "output_dir": str(Path(assets["root"]) / mode)},
    }
    result = train(config_from_dict(raw))
    return [json.loads(line)["loss"] for line in Path(result.metrics_file).read_text().splitlines()]


def test_cached_reference_trains_like_a_separate_copy(assets):
    cached, copy = run(assets, "cached"), run(assets, "copy")
    assert len(cached) == 3
    assert cached == pytest.approx(copy, abs=1e-5)  # same batches, same reference values
