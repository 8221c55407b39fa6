"""The training loop: one accelerate loop for every modality and every loss. Read it top to bottom.

folder = run_folder.inspect(cfg)                    # new, resume or overwrite: decided before anything is written
adapter = get_adapter_class(cfg.modality)(cfg, objectives)  # models + data of one modality, validated
run_folder.commit(...)                              # only now: config.yaml, run.json
stream = dataset batches (each phase's own), or the policy's own samples judged as they are drawn (cfg.online)
for step in range(start, total):                    # global optimizer steps
    phase = phase_at(plan, step)                    # pure function of the step: same on every process
    (entering a phase with reference.from_phase_start: the reference becomes the policy as it is now)
    for _ in range(grad_accum):                     # micro-batches from the stream
        scores = adapter.scores(policy, batch, loss); loss(scores).loss.backward()
    clip, optimizer.step, scheduler.step, log, checkpoint
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmpref.adapters import Adapter
from mmpref.config import OptimConfig, RunConfig, TrainConfig, build_objectives, config_to_dict
from mmpref.errors import CheckpointError, ConfigError, MmprefError, writing_to
from mmpref.io import atomic_dir, atomic_file, write_text_atomic
from mmpref.losses.registry import tagged_metrics
from mmpref.modalities import get_adapter_class
from mmpref.online.source import OnlineSource

from . import hub, run_folder
from .checkpoint import flatten_loss_states, load_checkpoint, newest_intact, save_checkpoint
from .curves import plot_curves
from .phases import Phase, phase_at, plan_phases


class TrainingError(MmprefError, RuntimeError):
    """Training stopped (non-finite loss, a failing batch); the message names the step and the phase."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    metrics: dict[str, float]  # the last logged metrics
    output_dir: str
    final_dir: str  # adapter.save_pretrained output
    checkpoint: str | None  # newest complete checkpoint
    metrics_file: str  # JSONL, one line per logged step
    policy: nn.Module | None = field(default=None, repr=False)  # the trained (unwrapped) policy, in memory


def _forget_earlier_runs() -> None:
    """Let a second ``train()`` in one process use other ``cpu`` / ``mixed_precision`` / accumulation settings.

    accelerate keeps its state in process-wide singletons and refuses changed settings. Outside a distributed launch
    nothing else holds that state, so it is cleared, as accelerate's own test cases do between tests (a private
    helper: there is no public one). Inside a launch the process group lives in it: it is kept, and settings must
    match."""
    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg``'s policy with its adapter and its loss (or phases of losses); see the module docstring.

    The run lives in ``cfg.run.output_dir`` (rules: :mod:`mmpref.training.run_folder`): a new run claims an empty
    folder only after the models and data have loaded and passed their checks; a folder holding the same run is
    resumed from its newest intact checkpoint, exactly. Returns where the final model and the metrics are.
    """
    folder = run_folder.inspect(cfg)  # reads only: a launch that fails below leaves the folder as it was
    with writing_to(folder.out):
        return _train(cfg, folder)


def _train(cfg: TrainConfig, folder: run_folder.FolderPlan) -> TrainResult:
    run, out = cfg.run, folder.out
    hub.check_push(cfg)  # before hours of training, not after
    _forget_earlier_runs()
    accelerator = Accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        # we always feed whole accumulation windows, also across epoch ends: never sync at the end of a dataloader
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=run.grad_accum, sync_with_dataloader=False),
        # shuffling is a function of (seed, epoch) only, so a resumed run sees exactly the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed),
        log_with=_trackers(run.report_to),
        project_dir=str(out),
    )

    _check_backend(accelerator)

    # ----- model, data, objectives --------------------------------------------------------------------------------
    set_seed(run.seed)  # identical initial weights on every process
    objectives = build_objectives(cfg)  # one per phase; the only place they are built
    adapter = get_adapter_class(cfg.modality)(cfg, objectives)  # refuses an objective it cannot serve
    run_folder.check_data(folder, adapter.data_fingerprint())
    losses = [o.loss for o in objectives]
    adapter.setup(accelerator)  # once, for everything any phase needs
    accelerator.wait_for_everyone()  # every process has inspected the folder before the main process claims it
    if accelerator.is_main_process:
        run_folder.commit(folder, cfg, adapter.data_fingerprint())
    optimizer = _adamw(adapter.policy, cfg.optim)
    if cfg.online is None:  # batches from the dataset: one loader per distinct phase dataset
        # after setup: it may replace the datasets (e.g. add cached reference columns)
        datasets = list({id(d): d for d in adapter.phase_train_datasets}.values())
        policy, optimizer, *loaders = accelerator.prepare(adapter.policy, optimizer, *[DataLoader(
            d,
            batch_size=run.batch_size,
            shuffle=True,
            collate_fn=adapter.collate,
            num_workers=run.num_workers,
            generator=torch.Generator().manual_seed(run.seed),  # keeps DataLoader seeding off the global RNG
        ) for d in datasets])
        by_id = {id(d): loader for d, loader in zip(datasets, loaders)}
        phase_loaders = [by_id[id(d)] for d in adapter.phase_train_datasets]
        plan = plan_phases(cfg, batches_per_epoch=[len(loader) for loader in phase_loaders])
        stream = _DatasetStream(accelerator, phase_loaders, plan, run.grad_accum)
    else:  # batches from the policy's own samples, judged as they are drawn
        policy, optimizer = accelerator.prepare(adapter.policy, optimizer)
        stream = OnlineSource(cfg, adapter, accelerator, out)
        plan = [Phase(0, objectives[0].phase, 0, stream.total_steps)]
    eval_loaders = _eval_loaders(accelerator, adapter, run)
    total = plan[-1].end
    scheduler = get_scheduler(
        {"constant": "constant_with_warmup"}.get(cfg.optim.scheduler, cfg.optim.scheduler),
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=total,
    )
    # not prepared: accelerate's wrapper steps the schedule num_processes times per step; ours counts optimizer steps

    # ----- resume -------------------------------------------------------------------------------------------------
    ckpt = _agreed(accelerator, lambda: newest_intact(out)) if folder.mode == "resume" else None
    step = load_checkpoint(accelerator, ckpt, scheduler, losses) if ckpt else 0
    if ckpt is None:
        set_seed(run.seed, device_specific=True)  # different noise/timesteps per process from here on
    else:
        accelerator.print(f"resumed from {ckpt} at step {step}")
        _restore_reference(cfg, adapter, plan, step, out)
    metrics_file = out / "metrics.jsonl"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_file, step)  # drop lines a crashed run logged after its last checkpoint
    if accelerator.log_with:  # the trackers asked for and installed; accelerator.trackers fills only here
        accelerator.init_trackers("mmpref", config=_flat(config_to_dict(cfg)))

    # ----- the loop -----------------------------------------------------------------------------------------------
    batches = stream.batches(policy, first=step * run.grad_accum)
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    last: dict[str, float] = {}
    phase: Phase | None = None
    started = time.perf_counter()
    while step < total:
        if phase is None or not phase.start <= step < phase.end:
            phase = phase_at(plan, step)
            if accelerator.is_main_process:
                bar.write(f"phase {phase.name!r} ({phase.index + 1}/{len(plan)}): steps {phase.start}..{phase.end}")
            if step == phase.start and phase.index > 0 and cfg.reference.from_phase_start \
                    and adapter.ref_mode != "none":  # "none": no phase needs a reference
                _reference_from_policy(accelerator, adapter, policy, optimizer, phase, out, run.seed)
        loss = objectives[phase.index].loss
        policy.train()
        with _context(step, phase):
            local, finite = [], True
            for _ in range(run.grad_accum):
                with accelerator.accumulate(policy):  # no_sync on all but the last; loss / grad_accum in backward
                    batch = next(batches)
                    res = loss(adapter.scores(policy, batch, loss))
                    accelerator.backward(res.loss)
                finite &= bool(torch.isfinite(res.loss.detach()))
                local.append({**_floats(res.metrics), **_tag_metrics(res, batch), **adapter.step_metrics(),
                              **stream.step_metrics(), "loss": res.loss.item()})
            assert accelerator.sync_gradients, "accumulation window out of step with grad_accum"
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm or math.inf)
            if run.mixed_precision != "fp16":  # fp16's scaler skips inf steps by design; elsewhere they corrupt
                finite &= bool(torch.isfinite(grad_norm))
            _stop_if_not_finite(accelerator, finite, step, phase, out)
            lr = scheduler.get_last_lr()[0]  # the rate this update used
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 overflow steps leave the schedule where it is
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % run.log_every == 0 or step == total:
            last = _mean_over_processes(_mean(local))
            last.update(step=step, phase=phase.name, lr=lr, grad_norm=float(grad_norm))
            last.update(epoch=stream.epoch(step), elapsed_s=time.perf_counter() - started)
            _log(accelerator, metrics_file, last)
            bar.set_postfix(loss=f"{last['loss']:.4g}", phase=phase.name)
        if eval_loaders[phase.index] is not None and step % run.eval_every == 0:
            _log(accelerator, metrics_file,
                 {"step": step, **_evaluate(adapter, policy, loss, eval_loaders[phase.index])})
        if step % run.save_every == 0 or step == total:
            state = {"phase": phase.name, "epoch": stream.epoch(step)}
            ckpt = save_checkpoint(accelerator, out, step, state, keep=run.keep_checkpoints, scheduler=scheduler,
                                   loss_states=flatten_loss_states(losses))
    bar.close()

    final = out / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        card = hub.model_card(cfg, plan, metrics_file, adapter.card_metadata())
        _save_final(adapter, accelerator.unwrap_model(policy), final, card)
        if metrics_file.exists():
            plot_curves(metrics_file)  # training_curves.png beside metrics.jsonl
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.push_to_hub and accelerator.is_main_process:
        accelerator.print(f"uploaded {final} to the Hub: {hub.push(final, cfg)}")
    return TrainResult(step=step, metrics=last, output_dir=str(out), final_dir=str(final),
                       checkpoint=str(ckpt) if ckpt else None, metrics_file=str(metrics_file), policy=adapter.policy)


def _check_backend(accelerator: Any) -> None:
    """Refuse the backends whose sharded weights mmpref does not gather yet (final/ would not be the whole model
    and the frozen reference would be a full copy on every device); say what runs instead."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == "FSDP" or (kind == "DEEPSPEED" and plugin is not None and plugin.zero_stage == 3):
        raise ConfigError(f"this launch uses {'FSDP' if kind == 'FSDP' else 'DeepSpeed ZeRO-3'}, whose sharded "
                          "weights mmpref does not gather or shard yet (the final model and the frozen reference); "
                          "launch with DDP (accelerate launch --multi_gpu) or DeepSpeed ZeRO-1/2, with LoRA or "
                          "reference.mode=lora to save memory")


def _agreed(accelerator: Accelerator, fn: Any) -> Any:
    """``fn()`` on the main process, its result (or its error) shared with every process."""
    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box = [("ok", fn())]
        except MmprefError as e:
            box = [("error", str(e))]
    if accelerator.num_processes > 1:
        box = broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


# ----- pieces of the loop -------------------------------------------------------------------------------------------
class _DatasetStream:
    """The batches of an offline run: each phase's prepared DataLoader, epoch after epoch (an online run's
    counterpart is :class:`mmpref.online.source.OnlineSource`). Phases on the same data share a loader, whose
    epochs run on from one phase into the next; a phase with its own data starts that data's first epoch."""

    def __init__(self, accelerator: Accelerator, loaders: list[Any], plan: list[Phase], grad_accum: int):
        self.accelerator, self.loaders, self.plan, self.grad_accum = accelerator, loaders, plan, grad_accum

    def batches(self, policy: nn.Module, first: int) -> Iterator[dict]:
        """An endless stream of micro-batches, ``grad_accum`` per optimizer step from that step's phase's loader,
        starting at micro-batch ``first`` (0 for a fresh run; a multiple of ``grad_accum``)."""
        running: dict[int, Iterator[dict]] = {}
        for step in count(first // self.grad_accum):
            loader = self.loaders[phase_at(self.plan, min(step, self.plan[-1].end - 1)).index]
            if id(loader) not in running:
                running[id(loader)] = self._endless(loader, self._used(loader, step))
            for _ in range(self.grad_accum):
                yield next(running[id(loader)])

    def _endless(self, loader: Any, first: int) -> Iterator[dict]:
        epoch, skip = divmod(first, len(loader))
        while True:
            loader.set_epoch(epoch)
            yield from self.accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch, skip = epoch + 1, 0

    def _used(self, loader: Any, step: int) -> int:
        """Micro-batches ``loader`` has handed out before optimizer step ``step``."""
        steps = sum(max(0, min(step, p.end) - p.start) for p in self.plan if self.loaders[p.index] is loader)
        return steps * self.grad_accum

    def epoch(self, step: int) -> float:
        """Epochs of the current phase's data seen after ``step`` optimizer steps."""
        loader = self.loaders[phase_at(self.plan, max(step - 1, 0)).index]
        return self._used(loader, step) / len(loader)

    def step_metrics(self) -> dict[str, float]:
        return {}


@contextmanager
def _context(step: int, phase: Phase) -> Iterator[None]:
    """Failures inside a step are re-raised naming the step and phase."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as e:
        raise TrainingError(f"step {step + 1} (phase {phase.name!r}) failed: {type(e).__name__}: {e}") from e


def _stop_if_not_finite(accelerator: Accelerator, finite: bool, step: int, phase: Phase, out: Path) -> None:
    """All processes agree (one collective) and stop before the optimizer step, so no corrupted state is saved."""
    bad = accelerator.reduce(torch.tensor(0.0 if finite else 1.0, device=accelerator.device), "sum")
    if bad.item() > 0:
        raise TrainingError(
            f"non-finite loss at step {step + 1} (phase {phase.name!r}) on {int(bad.item())} process(es); "
            f"stopped before the update; the last good checkpoint in {out} is kept"
        )


def _adamw(policy: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; biases and norms (ndim < 2) without weight decay, as in nanoGPT."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (requires_grad=False everywhere)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach: one kernel per operation over all tensors instead of a Python loop over them. torch picks it only for
    # CUDA tensors; on a CPU it is the same arithmetic (bitwise: tests/test_engine.py), 1.4x faster per step for the
    # demo's UNet of 208 small tensors (benchmarks/adamw_foreach.py).
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=True)


def _tag_metrics(res: Any, batch: Any) -> dict[str, float]:
    """Per-tag reward accuracy and margin when the batch names each group's tag (``batch["tags"]``)."""
    tags = batch.get("tags") if isinstance(batch, dict) else None
    return _floats(tagged_metrics(res.rewards, tags)) if tags else {}


def _floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean, ignoring NaN (e.g. an unpaired micro-batch without undesirable rows)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def _mean_over_processes(local: dict[str, float]) -> dict[str, float]:
    """Average over processes; tolerant of keys only some processes have (e.g. timestep bins)."""
    return _mean(gather_object([local]))


def _log(accelerator: Accelerator, path: Path, metrics: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])


def _eval_loaders(accelerator: Accelerator, adapter: Adapter, run: RunConfig) -> list[Any | None]:
    """Each phase's evaluation loader (None: no evaluation in that phase); one per distinct dataset."""
    sets = adapter.phase_eval_datasets if run.eval_every else [None] * len(adapter.phase_eval_datasets)
    made: dict[int, Any] = {}
    for d in sets:
        if d is not None and id(d) not in made:  # prepared once: save_state/load_state count dataloaders
            made[id(d)] = accelerator.prepare_data_loader(
                DataLoader(d, batch_size=run.batch_size, collate_fn=adapter.collate))
    return [made[id(d)] if d is not None else None for d in sets]


# ----- the reference at phase starts (reference.from_phase_start) ---------------------------------------------------
def _reference_file(out: Path, phase: Phase) -> Path:
    return out / "reference" / f"phase{phase.index}-{phase.name}.safetensors"


def _reference_from_policy(accelerator: Accelerator, adapter: Adapter, policy: nn.Module, optimizer: Any,
                           phase: Phase, out: Path, seed: int) -> None:
    """The reference becomes the policy as the previous phase left it; the new phase starts with fresh optimizer
    moments, as a separate run from that model would. A frozen copy's weights are kept beside the checkpoints."""
    state = adapter.reference_from_policy(policy, seed=seed + phase.index)
    optimizer.state.clear()  # AdamW restarts its moments (and bias correction) lazily
    if state is not None and accelerator.is_main_process:
        path = _reference_file(out, phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(state, str(tmp))
    accelerator.print(f"phase {phase.name!r}: the reference is now the policy as the previous phase ended")


def _restore_reference(cfg: TrainConfig, adapter: Adapter, plan: list[Phase], step: int, out: Path) -> None:
    """On resume: the reference of the phase the run stopped in, if it was taken from the policy (copy mode; a
    folded LoRA adapter is in the policy's checkpoint already). A phase entered exactly at ``step`` takes it anew."""
    if not cfg.reference.from_phase_start or adapter.ref_mode != "copy" or step >= plan[-1].end:
        return
    phase = phase_at(plan, step)
    if phase.index == 0 or step == phase.start:
        return
    path = _reference_file(out, phase)
    if not path.exists():
        raise CheckpointError(f"{path}: missing; it holds the reference of phase {phase.name!r} "
                              "(reference.from_phase_start) this run needs to resume")
    adapter.set_reference(state=load_file(str(path)))


@torch.no_grad()
def _evaluate(adapter: Adapter, policy: nn.Module, loss: Any, loader: Any) -> dict[str, float]:
    policy.eval()
    rows = []
    for b in loader:
        res = loss(adapter.scores(policy, b, loss))
        rows.append({**_floats(res.metrics), **_tag_metrics(res, b), **adapter.step_metrics()})
    policy.train()
    return {f"eval/{k}": v for k, v in _mean_over_processes(_mean(rows)).items()}


def _save_final(adapter: Adapter, policy: nn.Module, final: Path, card: str) -> None:
    """adapter.save_pretrained and the model card (README.md) into a temp folder that then takes ``final``'s
    place: never half-written."""
    with atomic_dir(final) as tmp:
        adapter.save_pretrained(policy, str(tmp))
        (Path(tmp) / "README.md").write_text(card)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines logged up to ``step``; a partial last line (a kill mid-write) is dropped, not fatal."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _trackers(report_to: list[str]) -> list[str] | None:
    """The requested accelerate trackers that are installed (missing ones are skipped with a warning)."""
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in report_to if t not in available]
    if missing:
        print(f"mmpref: trackers not installed, skipped: {missing}")
    return [t for t in report_to if t in available] or None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat scalar dict for trackers' hparams."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
