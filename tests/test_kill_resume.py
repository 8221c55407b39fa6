"""kill -9 and resume: the result equals the uninterrupted run's, bit for bit, and nothing is duplicated.

The killed runs are real ``mmpref`` processes stopped with SIGKILL at a chosen moment: after a given step was
logged, or while a checkpoint folder is being written (its ``.tmp`` folder exists). The resumed and the
uninterrupted runs run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.tiny_llm import tiny_llm_overrides, write_tiny_llm_assets
from safetensors.torch import load_file

from mmpref.cli import main

ROOT = Path(__file__).resolve().parents[1]
MMPREF = Path(sys.executable).parent / "mmpref"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def run_until(argv: list[str], stop: Callable[[], bool], timeout: float = 180) -> bool:
    """Start ``mmpref argv``; SIGKILL it as soon as ``stop()`` is true. Returns whether it was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(MMPREF), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if stop():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    if proc.poll() is None:
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


def logged_step(run: Path, step: int) -> Callable[[], bool]:
    def stop() -> bool:
        try:
            return any(json.loads(line).get("step") == step for line in (run / "metrics.jsonl").read_text().splitlines()
                       if line.endswith("}"))
        except (OSError, ValueError):
            return False

    return stop


def saving(run: Path, at_least: int) -> Callable[[], bool]:
    """True while a checkpoint of step >= ``at_least`` is being written."""
    def stop() -> bool:
        return any(int(p.name.split("-")[1].split(".")[0]) >= at_least for p in run.glob("checkpoint-*.tmp"))

    return stop


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name, value in wa.items():
        assert torch.equal(value, wb[name]), name


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return write_tiny_llm_assets(tmp_path_factory.mktemp("kill-llm"))


def llm_argv(assets: dict, run: Path) -> list[str]:
    over = [o for o in tiny_llm_overrides(assets, run) if o != "run.resume=false"]
    return ["train", str(ROOT / "configs" / "llm_dpo_tiny.yaml"), *over, "data.eval_split=null", "run.max_steps=8",
            "run.save_every=1", "run.keep_checkpoints=2", "run.resume=true"]


@pytest.mark.parametrize("moment", ["after-step-3", "while-saving"])
def test_llm_killed_then_resumed_equals_uninterrupted(moment, tmp_path, assets):
    whole = tmp_path / "whole"
    assert main(llm_argv(assets, whole)) == 0
    run = tmp_path / "killed"
    stop = logged_step(run, 3) if moment == "after-step-3" else saving(run, 4)
    assert run_until(llm_argv(assets, run), stop), "the run finished before the kill"
    assert main(llm_argv(assets, run)) == 0
    assert metrics_steps(run) == list(range(1, 9))  # no step lost or logged twice
    assert_same_weights(run / "final" / "model.safetensors", whole / "final" / "model.safetensors")
    assert not list(run.glob("*.tmp"))


def tango_argv(run: Path, cache: Path) -> list[str]:
    """The tiny Tango 2 recipe: 4 SFT steps on the winners, then 4 DPO steps; a checkpoint after every step."""
    return ["train", str(ROOT / "configs" / "tango2_dpo_tiny.yaml"), f"run.output_dir={run}",
            f"data.cache_dir={cache}", "run.save_every=1", "run.keep_checkpoints=2", "run.resume=true"]


@pytest.mark.parametrize("moment", ["after-the-phase-switch", "while-saving-the-first-dpo-step"])
def test_diffusion_killed_across_the_phase_switch_equals_uninterrupted(moment, tmp_path):
    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    assert main(tango_argv(whole, cache)) == 0
    run = tmp_path / "killed"
    stop = logged_step(run, 5) if moment == "after-the-phase-switch" else saving(run, 5)
    assert run_until(tango_argv(run, cache), stop), "the run finished before the kill"
    assert main(tango_argv(run, cache)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in rows] == [(s, "sft" if s <= 4 else "dpo") for s in range(1, 9)]
    assert_same_weights(run / "final" / "unet" / "diffusion_pytorch_model.safetensors",
                        whole / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def test_synth_killed_mid_shard_resumes_without_duplicates(tmp_path):
    captions = ROOT / "tests" / "data" / "captions_audiocaps.jsonl"
    fast = ["generation.duration_s=0.5", "generation.steps=2", "generation.resample_steps=[1,2]", "max_captions=6",
            "shard_size=2"]
    argv = lambda out: ["synth", str(ROOT / "configs" / "synth_tiny.yaml"), f"captions={captions}",  # noqa: E731
                        f"output_dir={out}", *fast]
    assert main(argv(tmp_path / "whole")) == 0
    run = tmp_path / "killed"
    mid_shard = lambda: any(not (d / "done.json").exists() and any((d / "audio").glob("*"))  # noqa: E731
                            for d in (run / "shards").glob("shard_00001"))
    assert run_until(argv(run), mid_shard), "the run finished before the kill"
    assert main(argv(run)) == 0
    for name in ("pairs.jsonl", "grouped.jsonl"):
        got = (run / name).read_text().splitlines()
        assert got == (tmp_path / "whole" / name).read_text().splitlines()
        assert len(got) == len(set(got))  # zero duplicates
    assert len((run / "candidates.jsonl").read_text().splitlines()) == \
        len((tmp_path / "whole" / "candidates.jsonl").read_text().splitlines())


def test_a_killed_re_merge_is_completed_by_the_next_run(tmp_path, monkeypatch):
    """Re-filtering publishes dataset/, the jsonl files and report.json as one unit: a kill between two of its
    moves leaves a READY staging folder that the next run finishes; no output mixes two merges."""
    import mmpref.synthesis.merge as merge_module
    from mmpref.synthesis import load_synth_config, run_synthesis

    captions = ROOT / "tests" / "data" / "captions_audiocaps.jsonl"
    over = [f"captions={captions}", f"output_dir={tmp_path / 's'}", "generation.duration_s=0.5", "generation.steps=2",
            "generation.resample_steps=[1,2]", "max_captions=4"]
    config = ROOT / "configs" / "synth_tiny.yaml"
    first = run_synthesis(load_synth_config(config, over))
    tighter = [*over, "scorers.tiny_clap.delta_min=0.0005"]
    real_replace, moves = os.replace, []

    def dying_replace(src, dst):  # the kill comes after two of the publish's moves into the run folder
        if Path(dst).parent == tmp_path / "s" and Path(src).parent.name == merge_module.STAGING:
            moves.append(Path(dst).name)
            if len(moves) == 3:
                raise KeyboardInterrupt("killed while publishing")
        real_replace(src, dst)

    monkeypatch.setattr(merge_module.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_synthesis(load_synth_config(config, tighter))
    monkeypatch.setattr(merge_module.os, "replace", real_replace)
    assert (tmp_path / "s" / merge_module.STAGING / merge_module.READY).exists() and moves == \
        ["dataset", "grouped.jsonl", "pairs.jsonl"]
    second = run_synthesis(load_synth_config(config, tighter))
    out = tmp_path / "s"
    assert not (out / merge_module.STAGING).exists() and not list(out.glob(".*.tmp"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["filters"]["tiny_clap"]["delta_min"] == 0.0005
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == second.report["pairs"] <= first.report["pairs"]
    import datasets

    grouped = (out / "grouped.jsonl").read_text().splitlines()
    assert len(datasets.load_from_disk(str(out / "dataset"))) == len(grouped)  # K = 1: every kept group
    assert all(p["chosen_scores"]["tiny_clap"] - p["rejected_scores"]["tiny_clap"] >= 0.0005 for p in pairs)
