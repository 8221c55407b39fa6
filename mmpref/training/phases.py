"""Multi-stage recipes as a pure function of the global optimizer step.

Every process computes the same plan from the same config and dataloader length, so a phase switch happens at the
same step everywhere (the Tango 2 reference counted its SFT->DPO switch on the main process only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmpref.config import ConfigError, PhaseConfig, TrainConfig


@dataclass(frozen=True)
class Phase:
    """Where phase ``index`` runs; its loss is ``objectives[index]`` (:func:`mmpref.config.build_objectives`)."""

    index: int
    name: str
    start: int  # first global optimizer step (0-based)
    end: int  # one past the last


def plan_phases(cfg: TrainConfig, batches_per_epoch: int | list[int]) -> list[Phase]:
    """Phase boundaries in optimizer steps. A single ``loss`` is one phase named ``train``.

    ``epochs`` count micro-batches of this process's dataloader for that phase (``batches_per_epoch``: one number
    for all phases, or one per phase when phases have their own data), ``grad_accum`` of them per optimizer step,
    rounded up. The last phase may be open-ended: it runs until ``run.max_steps`` or ``run.epochs`` (of its own
    data). ``run.max_steps``, when set, caps the whole run.
    """
    run = cfg.run
    specs = cfg.phases or [PhaseConfig(name="train", loss=cfg.loss)]
    per_phase = batches_per_epoch if isinstance(batches_per_epoch, list) else [batches_per_epoch] * len(specs)
    to_steps = lambda epochs, i: max(1, math.ceil(epochs * per_phase[i] / run.grad_accum))  # noqa: E731
    lengths = [p.max_steps if p.max_steps is not None else to_steps(p.epochs, i) if p.epochs else None
               for i, p in enumerate(specs)]
    if run.max_steps is not None:
        total = run.max_steps
    elif lengths[-1] is not None:
        total = sum(lengths)
    else:
        total = to_steps(run.epochs, len(specs) - 1)
    phases, start = [], 0
    for i, (spec, n) in enumerate(zip(specs, lengths)):
        end = min(total, start + n) if n is not None else total
        if end <= start:
            if run.max_steps is not None and i > 0:
                break  # run.max_steps cut the recipe short, on purpose
            raise ConfigError(f"phases.{i} ({spec.name!r}) would get no steps: the run ends at step {total}")
        phases.append(Phase(i, spec.name, start, end))
        start = end
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that optimizer step ``step`` (0-based) belongs to."""
    for p in phases:
        if p.start <= step < p.end:
            return p
    raise IndexError(f"step {step} is outside the plan (0..{phases[-1].end - 1})")
