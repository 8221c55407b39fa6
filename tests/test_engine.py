"""The training engine on the toy adapter (CPU, one process): phases, accumulation, exact resume, failures."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.toy import toy_config
from safetensors.torch import load_file

from mmpref.config import config_from_dict
from mmpref.training import TrainingError, phase_at, plan_phases, train
from mmpref.training.checkpoint import complete_checkpoints


def run(raw: dict):
    return train(config_from_dict(raw))


def losses(result) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines()]
    return [(r["step"], r["phase"], r["loss"]) for r in rows if "loss" in r]


def final_params(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.final_dir) / "model.safetensors"))


def calls(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"toy-calls-rank{rank}.jsonl").read_text().splitlines()]


# ----- the phase plan ------------------------------------------------------------------------------------------------
def test_phase_plan_is_a_function_of_the_step(tmp_path: Path):
    phases = [{"name": "sft", "loss": "sft", "epochs": 1}, {"name": "dpo", "loss": "dpo"}]
    cfg = config_from_dict(toy_config(tmp_path, phases=phases, run={"grad_accum": 2, "epochs": 3}))
    plan = plan_phases(cfg, batches_per_epoch=5)  # 1 epoch = ceil(5 / 2) = 3 optimizer steps
    assert [(p.name, p.start, p.end) for p in plan] == [("sft", 0, 3), ("dpo", 3, 8)]  # run: ceil(3 * 5 / 2) = 8
    assert [phase_at(plan, s).name for s in range(8)] == ["sft"] * 3 + ["dpo"] * 5
    capped = config_from_dict(toy_config(tmp_path, phases=phases, run={"max_steps": 2}))
    assert [(p.name, p.start, p.end) for p in plan_phases(capped, 5)] == [("sft", 0, 2)]  # max_steps caps the recipe
    sized = [{"name": "a", "loss": "sft", "max_steps": 2}, {"name": "b", "loss": "dpo", "epochs": 0.5}]
    cfg = config_from_dict(toy_config(tmp_path, phases=sized))
    assert [(p.start, p.end) for p in plan_phases(cfg, 4)] == [(0, 2), (2, 4)]  # all sized: their sum


def test_phase_switch_happens_at_the_planned_step(tmp_path: Path):
    phases = [{"name": "sft", "loss": {"sft": 1.0}, "epochs": 1}, {"name": "dpo", "loss": {"dpo": {"beta": 0.5}}}]
    res = run(toy_config(tmp_path, phases=phases, run={"grad_accum": 2, "epochs": 2}))
    # 16 rows / batch 4 = 4 micro-batches per epoch = 2 optimizer steps of 2 micro-batches
    assert [c["loss"] for c in calls(Path(res.output_dir))] == ["sft"] * 4 + ["dpo"] * 4
    assert [(s, p) for s, p, _ in losses(res)] == [(1, "sft"), (2, "sft"), (3, "dpo"), (4, "dpo")]
    assert res.step == 4 and res.metrics["phase"] == "dpo"


# ----- gradient accumulation -----------------------------------------------------------------------------------------
def test_grad_accumulation_matches_a_bigger_batch(tmp_path: Path):
    big = run(toy_config(tmp_path / "a", run={"batch_size": 4, "grad_accum": 1, "epochs": 2}))
    acc = run(toy_config(tmp_path / "b", run={"batch_size": 2, "grad_accum": 2, "epochs": 2}))
    assert len(losses(big)) == len(losses(acc)) == 8
    for (_, _, a), (_, _, b) in zip(losses(big), losses(acc)):
        assert a == pytest.approx(b, abs=1e-6)
    for k, v in final_params(big).items():
        torch.testing.assert_close(v, final_params(acc)[k], atol=1e-6, rtol=0)


# ----- exact resume --------------------------------------------------------------------------------------------------
def resume_config(tmp_path: Path, **model) -> dict:
    """sft for 4 steps then bco (stateful: a running reward shift), noisy scores (RNG), mid-epoch checkpoints."""
    phases = [{"name": "sft", "loss": {"sft": 1.0}, "max_steps": 4}, {"name": "bco", "loss": {"bco": {"beta": 0.5}}}]
    train = {"grad_accum": 2, "max_steps": 9, "save_every": 3, "keep_checkpoints": 3}
    return toy_config(tmp_path, phases=phases, model={"noise": 0.1, **model}, run=train, optim={"warmup_steps": 2})


def test_resume_after_a_crash_reproduces_the_loss_curve(tmp_path: Path, monkeypatch):
    whole = run(resume_config(tmp_path / "whole"))

    crashed = resume_config(tmp_path / "crash")
    monkeypatch.setenv("TOY_FAIL_AT_CALL", "9")  # step 5's first micro-batch
    with pytest.raises(TrainingError, match=r"step 5 \(phase 'bco'\) failed: RuntimeError: simulated crash"):
        run(crashed)
    monkeypatch.delenv("TOY_FAIL_AT_CALL")
    out = Path(crashed["run"]["output_dir"])
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-00000003"]
    # debris a crash can leave: a half-written temp dir and a directory without the `complete` marker
    shutil.copytree(out / "checkpoint-00000003", out / "checkpoint-00000006.tmp")
    (out / "checkpoint-00000006.tmp" / "complete").unlink()
    (out / "checkpoint-00000008").mkdir()
    (out / "checkpoint-00000008" / "model.safetensors").write_text("garbage")

    resumed = run(resume_config(tmp_path / "crash"))  # same config, no crash: continues from step 3 (mid-epoch)
    assert resumed.step == whole.step == 9
    got, want = losses(resumed), losses(whole)
    assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in want]  # no duplicated or missing steps
    for (_, _, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6)
    for k, v in final_params(whole).items():
        torch.testing.assert_close(final_params(resumed)[k], v, atol=1e-6, rtol=0)
    # the resumed run replays the same data: the toy's call log after the crash equals the whole run's from step 4
    replay = [c["idx"] for c in calls(out)][8 + 0 :]  # calls 1-8 crashed run (steps 1-4), then the resumed run
    assert replay[: len(calls(Path(whole.output_dir))[6:])] != []  # sanity
    assert [c["idx"] for c in calls(out)][-12:] == [c["idx"] for c in calls(Path(whole.output_dir))][6:]


def test_rerunning_a_finished_run_is_a_no_op(tmp_path: Path):
    raw = toy_config(tmp_path, run={"max_steps": 3})
    first = run(raw)
    again = run(raw)
    assert again.step == 3 and len(calls(Path(first.output_dir))) == 3  # no new batches were scored
    assert losses(again) == losses(first)


def test_train_calls_in_one_process_with_other_settings_do_not_leak(tmp_path: Path):
    """accelerate's process-wide state is cleared between runs: a bf16 run with accumulation, then a float32 one,
    then the first again gives the first run's losses and weights exactly (accelerate refused the second before)."""
    mixed = {"mixed_precision": "bf16", "grad_accum": 2, "max_steps": 3}
    first = run(toy_config(tmp_path / "a", run=mixed))
    plain = run(toy_config(tmp_path / "b", run={"max_steps": 3}))
    again = run(toy_config(tmp_path / "c", run=mixed))
    assert losses(again) == losses(first) != losses(plain)
    for name, value in final_params(first).items():
        torch.testing.assert_close(final_params(again)[name], value, rtol=0, atol=0)


def test_keeps_the_last_n_checkpoints(tmp_path: Path):
    res = run(toy_config(tmp_path, run={"max_steps": 5, "save_every": 1, "keep_checkpoints": 2}))
    names = [p.name for p in complete_checkpoints(Path(res.output_dir))]
    assert names == ["checkpoint-00000004", "checkpoint-00000005"]
    assert res.checkpoint.endswith("checkpoint-00000005")
    assert not list(Path(res.output_dir).glob("*.tmp"))


# ----- failures ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["nan_at_call", "inf_at_call"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, failure: str):
    raw = toy_config(tmp_path, model={failure: 7}, run={"max_steps": 10, "save_every": 2})
    with pytest.raises(TrainingError, match=r"step 7 \(phase 'train'\)") as e:
        run(raw)
    assert "NaN" in str(e.value) or "non-finite" in str(e.value)
    out = Path(raw["run"]["output_dir"])
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-00000004", "checkpoint-00000006"]
    assert not (out / "final").exists() and not list(out.glob("*.tmp"))
    weights = load_file(str(out / "checkpoint-00000006" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 6


def test_eval_and_result(tmp_path: Path):
    """The step-4 evaluation equals DPO computed by hand on the held-out rows with the final weights and the
    starting weights as reference (beta 0.5); the result points at what the run wrote."""
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from helpers.toy import ToyAdapter, ToyPolicy, _rows

    raw = toy_config(tmp_path, data={"eval_rows": 8}, run={"max_steps": 4, "eval_every": 2})
    res = run(raw)
    rows = [json.loads(line) for line in Path(res.metrics_file).read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    policy = ToyPolicy(4)
    policy.load_state_dict(final_params(res))
    set_seed(0)  # as the engine does before it builds the adapter: the reference is the starting policy
    reference = ToyAdapter(config_from_dict(raw)).reference
    x = torch.stack([r["x"] for r in _rows(8, 1, 4, seed=99)])  # the toy's held-out rows
    with torch.no_grad():
        r = policy(x) - reference(x)
    margin = 0.5 * (r[:, 0] - r[:, 1])
    assert evals[1]["eval/loss"] == pytest.approx(float(-F.logsigmoid(margin).mean()), abs=1e-6)
    assert evals[1]["eval/rewards/accuracies"] == pytest.approx(float((margin > 0).float().mean()), abs=1e-6)
    assert evals[1]["eval/rewards/margins"] == pytest.approx(float(margin.mean()), abs=1e-6)
    assert res.metrics["step"] == 4 and {"rewards/margins", "grad_norm", "lr"} <= res.metrics.keys()
    assert res.checkpoint.endswith("checkpoint-00000004")
    assert (Path(res.output_dir) / "config.yaml").exists() and (Path(res.final_dir) / "model.safetensors").exists()


def test_report_to_tensorboard_writes_the_logged_metrics(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run(toy_config(tmp_path, run={"epochs": 1, "log_every": 1, "report_to": ["tensorboard"]}))
    events = list(Path(res.output_dir).rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file was written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(s, loss) for s, _, loss in losses(res)]
    scalars = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in scalars] == [s for s, _ in logged]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_training_curves_are_drawn_from_the_logged_metrics(tmp_path: Path):
    from mmpref.training.curves import phase_starts, read_curves

    phases = [{"name": "sft", "loss": {"sft": 1.0}, "epochs": 1}, {"name": "dpo", "loss": {"dpo": {"beta": 0.5}}}]
    res = run(toy_config(tmp_path, phases=phases, run={"epochs": 2, "log_every": 1, "eval_every": 2},
                         data={"eval_rows": 8}))
    png = Path(res.output_dir) / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = read_curves(res.metrics_file)
    logged = losses(res)
    assert curves["loss"]["loss"] == ([s for s, _, _ in logged], [v for _, _, v in logged])
    rows = [json.loads(line) for line in Path(res.metrics_file).read_text().splitlines()]
    margins = [(r["step"], r["rewards/margins"]) for r in rows if "rewards/margins" in r]
    assert margins and curves["reward margin"]["rewards/margins"] == tuple(map(list, zip(*margins)))
    assert curves["loss"]["eval/loss"][0] == [r["step"] for r in rows if "eval/loss" in r] != []
    first_dpo = next(s for s, p, _ in logged if p == "dpo")
    assert phase_starts(res.metrics_file) == [(first_dpo, "dpo")]


@pytest.mark.parametrize("kind,stage,refused", [("FSDP", None, True), ("DEEPSPEED", 3, True),
                                                ("DEEPSPEED", 2, False), ("MULTI_CPU", None, False)])
def test_sharding_backends_mmpref_cannot_gather_are_refused_at_launch(kind, stage, refused):
    from types import SimpleNamespace

    from mmpref.errors import ConfigError
    from mmpref.training.engine import _check_backend

    plugin = SimpleNamespace(zero_stage=stage) if stage else None
    accelerator = SimpleNamespace(distributed_type=f"DistributedType.{kind}",
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    if refused:
        with pytest.raises(ConfigError, match="does not gather or shard yet .* launch with DDP"):
            _check_backend(accelerator)
    else:
        _check_backend(accelerator)


# ----- the optimizer -------------------------------------------------------------------------------------------------
def test_foreach_adamw_is_the_per_tensor_loop_bitwise():
    """The engine asks for torch's foreach AdamW (one kernel per operation over all tensors: faster for a model of
    many small tensors on a CPU). It must update exactly as the per-tensor loop torch picks on a CPU by default."""
    from mmpref.config import OptimConfig
    from mmpref.models.tango import TangoPipeline
    from mmpref.training.engine import _adamw

    unet = TangoPipeline.from_preset("tiny").unet  # ~200 tensors, biases and norms without weight decay
    twin = TangoPipeline.from_preset("tiny").unet
    ours = _adamw(unet, OptimConfig(lr=1e-3, weight_decay=0.1))
    twins = dict(twin.named_parameters())
    loop = torch.optim.AdamW([{"params": [twins[n] for n in names], "weight_decay": g["weight_decay"]}
                              for g, names in zip(ours.param_groups, _names(unet, ours))], foreach=False,
                             lr=1e-3, eps=ours.defaults["eps"], betas=ours.defaults["betas"])
    assert [g["foreach"] for g in ours.param_groups] == [True, True]
    assert [g["foreach"] for g in loop.param_groups] == [False, False]
    assert [g["weight_decay"] for g in loop.param_groups] == [0.1, 0.0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for (_, p), (_, q) in zip(unet.named_parameters(), twin.named_parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        loop.step()
    for (name, p), (_, q) in zip(unet.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(unet.conv_in.weight, TangoPipeline.from_preset("tiny").unet.conv_in.weight)  # it moved


def _names(module, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
