"""Two real processes (accelerate launch --multi_gpu, gloo on CPU): synced parameters and phases on every rank.

One launch trains three runs (tests/helpers/run_configs.py): the toy adapter, a tiny Llama with DPO and the tiny
Tango 2 recipe (SFT epoch, then DPO). ``accelerate launch --cpu --num_processes 2`` silently starts ONE process,
so the launch uses ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1``, and every check first proves that two processes
with distinct pids ran and saw a world of size 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.toy import ToyPolicy, toy_config
from safetensors.torch import load_file

from mmpref.config import config_from_dict
from mmpref.toy.llm import build_tiny_llama, synthetic_preferences
from mmpref.training import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "run_configs.py"
RANKS = (0, 1)

TOY_SECTIONS = {"data": {"rows": 16}, "run": {"batch_size": 4, "epochs": 2, "save_every": 100}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_run(tmp: Path) -> dict:
    return toy_config(tmp, **TOY_SECTIONS)


def _llm_run(tmp: Path) -> dict:
    rows = synthetic_preferences(16, seed=3)
    data = tmp / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    model = build_tiny_llama(tmp / "model", texts * 4, vocab_size=300, hidden_size=32, intermediate_size=64)
    return {
        "modality": "llm",
        "model": {"path": str(model), "logprob_chunk_size": 16},
        "data": {"path": str(data), "max_length": 48},
        "loss": {"dpo": {"beta": 0.1}},
        "optim": {"lr": 1.0e-3, "warmup_steps": 0},
        "run": {"batch_size": 2, "max_steps": 3, "cpu": True, "output_dir": str(tmp / "run"), "log_every": 1,
                  "save_every": 100, "resume": False},
    }


def _online_run(tmp: Path, schedule: str, batch_size: int, out: str) -> dict:
    """Online training of the LLM run's tiny Llama: the policy's own samples, judged by a rule (a callable)."""
    raw = _llm_run_base(tmp)
    raw["run"].update(batch_size=batch_size, output_dir=str(tmp / out), max_steps=None if schedule == "round" else 3)
    raw["optim"]["lr"] = 5e-3
    builder, judge = ("sppo", "helpers.judges:letter_preference") if schedule == "round" else \
        ("best_vs_worst", "helpers.judges:letter_reward")
    raw["online"] = {"prompts": str(tmp / "prefs.jsonl"), "schedule": schedule, "builder": builder, "samples": 4,
                     "judge": {"kind": "callable", "path": judge, "preference": schedule == "round"},
                     "generation": {"max_new_tokens": 6, "prompts_per_batch": 2}, "rounds": 2, "prompts_per_round": 8,
                     "update_reference": schedule == "round"}
    return raw


def _llm_run_base(tmp: Path) -> dict:
    """The LLM run's config on its existing model and data (written by :func:`_llm_run`)."""
    return {
        "modality": "llm",
        "model": {"path": str(tmp / "model"), "logprob_chunk_size": 16},
        "data": {"path": str(tmp / "prefs.jsonl"), "max_length": 48},
        "loss": {"dpo": {"beta": 0.1}},
        "optim": {"lr": 1.0e-3, "warmup_steps": 0},
        "run": {"batch_size": 2, "max_steps": 3, "cpu": True, "output_dir": str(tmp / "run"), "log_every": 1,
                "save_every": 100, "resume": False},
    }


def _write(raw: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, Path]:
    """Train toy, LLM and diffusion runs in one 2-process launch; returns each run's output_dir."""
    root = tmp_path_factory.mktemp("mp")
    (root / "toy").mkdir()
    (root / "llm").mkdir()
    runs = {"toy": root / "toy" / "run", "llm": root / "llm" / "run", "diffusion": root / "diffusion",
            "online_step": root / "llm" / "online_step", "online_round": root / "llm" / "online_round"}
    plan = [
        {"config": _write(_toy_run(root / "toy"), root / "toy.yaml")},
        {"config": _write(_llm_run(root / "llm"), root / "llm.yaml")},
        {"config": _write(_online_run(root / "llm", "step", 2, "online_step"), root / "online_step.yaml")},
        {"config": _write(_online_run(root / "llm", "round", 2, "online_round"), root / "online_round.yaml")},
        {  # the shipped tiny Tango 2 recipe, on 8 groups: 2 steps of SFT, then 2 of DPO (2 groups per process)
            "config": str(ROOT / "configs" / "tango2_dpo_tiny.yaml"),
            "overrides": ["data.path=tiny:8:1", "run.batch_size=2", f"run.output_dir={runs['diffusion']}"],
        },
    ]
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MMPREF_CACHE_DIR": str(root / "cache")}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), str(root / "plan.json")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return runs


def scores_log(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"scores-rank{rank}.jsonl").read_text().splitlines()]


def params(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"params-rank{rank}.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_two_processes_ran(out: Path) -> None:
    info = [json.loads((out / f"process-rank{r}.json").read_text()) for r in RANKS]
    assert [i["num_processes"] for i in info] == [2, 2]
    assert all(i["distributed_type"].endswith("MULTI_CPU") for i in info), info
    assert info[0]["pid"] != info[1]["pid"]
    assert not (out / "process-rank2.json").exists()


def assert_same_params(out: Path) -> dict[str, torch.Tensor]:
    p0, p1 = params(out, 0), params(out, 1)
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} differs between ranks"
    return p0


def assert_disjoint_shards(log0: list[dict], log1: list[dict], rows: int) -> None:
    """At every step the two processes see different rows; over an epoch, together, all of them."""
    assert len(log0) == len(log1)
    for a, b in zip(log0, log1):
        assert not set(a["idx"]) & set(b["idx"]), (a, b)
    per_epoch = rows // (2 * len(log0[0]["idx"]))
    seen = [i for log in (log0, log1) for call in log[:per_epoch] for i in call["idx"]]
    assert sorted(seen) == list(range(rows))


def test_toy_ranks_agree_and_equal_one_process_with_the_global_batch(launched, tmp_path):
    out = launched["toy"]
    assert_two_processes_ran(out)
    synced = assert_same_params(out)
    assert_disjoint_shards(scores_log(out, 0), scores_log(out, 1), rows=16)
    # DDP averages the two processes' gradients of their 4-row mean losses = one process on the 8-row batch made of
    # the same rows (accelerate's seedable sampler hands out consecutive batches of one permutation to the ranks)
    single = train(config_from_dict(toy_config(tmp_path, data=TOY_SECTIONS["data"],
                                               run={**TOY_SECTIONS["run"], "batch_size": 8})))
    assert single.step == len(scores_log(out, 0)) == 4
    for name, value in single.policy.state_dict().items():
        torch.testing.assert_close(synced[name], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)  # the engine's set_seed(run.seed) right before the adapter builds its ToyPolicy
    start = ToyPolicy(4).state_dict()
    assert not torch.equal(synced["linear.weight"], start["linear.weight"]), "training should move the weights"


def test_llm_dpo_ranks_stay_in_sync(launched):
    out = launched["llm"]
    assert_two_processes_ran(out)
    synced = assert_same_params(out)
    log0, log1 = scores_log(out, 0), scores_log(out, 1)
    assert len(log0) == len(log1) == 3
    assert all(call["loss"] == "dpo" and call["shape"] == [2, 2] for call in log0 + log1)
    for a, b in zip(log0, log1):
        assert not set(a["idx"]) & set(b["idx"])
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(out.parent / "model").state_dict()
    moved = [n for n in synced if n in start and not torch.equal(synced[n], start[n])]
    assert moved, "three DPO steps should change the weights"


def test_diffusion_every_process_in_the_same_phase_with_synced_params(launched):
    out = launched["diffusion"]
    assert_two_processes_ran(out)
    synced = assert_same_params(out)
    log0, log1 = scores_log(out, 0), scores_log(out, 1)
    # every scores() call on each rank: the same loss at the same step; SFT scores only the winners
    assert [(c["loss"], c["shape"]) for c in log0] == [(c["loss"], c["shape"]) for c in log1]
    assert [(c["loss"], c["shape"]) for c in log0] == [("sft", [2, 1])] * 2 + [("dpo", [2, 2])] * 2
    logged = metrics(out)
    assert [(m["step"], m["phase"]) for m in logged] == [(1, "sft"), (2, "sft"), (3, "dpo"), (4, "dpo")]
    assert all("rewards/accuracies" in m for m in logged if m["phase"] == "dpo")
    from mmpref.models.tango import TangoPipeline

    start = TangoPipeline.from_preset("tiny", seed=0).unet.state_dict()
    assert any(not torch.equal(synced[n], start[n]) for n in start), "four steps should change the UNet"
    final = TangoPipeline.from_pretrained(out / "final").unet.state_dict()
    assert all(torch.equal(final[n], synced[n]) for n in synced)


@pytest.mark.parametrize("schedule", ["step", "round"])
def test_online_rollouts_shard_over_processes_and_equal_one_process(launched, schedule, tmp_path):
    """Two processes sampling 2 prompts each per micro-batch train the weights one process sampling 4 trains:
    each prompt's samples depend on its position in the prompt stream alone (per-step and per-round schedules;
    the round schedule gathers the round's rollouts and moves the reference at the round boundary)."""
    out = launched[f"online_{schedule}"]
    assert_two_processes_ran(out)
    synced = assert_same_params(out)
    tmp = out.parent
    single = train(config_from_dict(_online_run(tmp, schedule, 4, f"single_{schedule}_{tmp_path.name}")))
    assert single.step == len(scores_log(out, 0)) == (3 if schedule == "step" else 4)
    for name, value in single.policy.state_dict().items():  # float32 all-reduce vs one batch: rounding only
        torch.testing.assert_close(synced[name], value, rtol=1e-4, atol=1e-5)
    if schedule == "step":  # each rank logged its own prompts: positions 0-1 / 2-3 of each 4-prompt micro-batch
        logs = [[json.loads(x) for x in (out / "rollouts" / f"steps-rank{r}.jsonl").read_text().splitlines()]
                for r in RANKS]
        assert [rec["position"] for rec in logs[0][:2]] == [0, 1] and [rec["position"] for rec in logs[1][:2]] == [2, 3]
    else:  # one saved round file with every prompt, drawn by both ranks
        records = (out / "rollouts" / "round-0000" / "records.jsonl").read_text().splitlines()
        assert [json.loads(x)["position"] for x in records] == list(range(8))
