"""Two CPU processes under ``accelerate launch`` split the shards and give the same dataset as one process.

Slow (two fresh interpreters import torch/transformers/diffusers: ~40 s on 2 cores), so opt-in:
``MMPREF_MULTIPROCESS_TESTS=1 pytest tests/test_synth_multiprocess.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.synth_outputs import snapshot

pytestmark = pytest.mark.skipif(os.environ.get("MMPREF_MULTIPROCESS_TESTS") != "1",
                                reason="set MMPREF_MULTIPROCESS_TESTS=1 to run the 2-process synthesis test")
OVERRIDES = ["generation.duration_s=0.5", "generation.steps=2"]
ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_split_shards_and_match_one_process(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    config = str(ROOT / "configs" / "synth_tiny.yaml")
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmpref.cli", "synth", config,
              f"output_dir={tmp_path / 'two'}", *OVERRIDES]
    subprocess.run(launch, env=env, cwd=ROOT, check=True, capture_output=True)
    subprocess.run([str(bin_dir / "mmpref"), "synth", config, f"output_dir={tmp_path / 'one'}", *OVERRIDES],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    ranks = [json.loads((tmp_path / "two" / "progress" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["shards"]) for r in ranks] == [(0, 2, [0]), (1, 2, [1])]  # both ranks worked
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
