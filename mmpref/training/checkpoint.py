"""Atomic, resumable checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is written into ``checkpoint-<step>.tmp``, gets a ``complete`` marker and ``trainer_state.json``, and
only then is renamed to ``checkpoint-<step>``; a crash mid-write leaves a ``.tmp`` directory that resume ignores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "complete"
STATE = "trainer_state.json"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (names are zero-padded, so name order is step order)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and not p.suffix and (p / MARKER).exists()]
    return sorted(found)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Every process calls this (``save_state`` writes per-process RNG files); the main process commits it."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / MARKER).write_text("")
        if final.exists():  # re-saving the same step (e.g. a rerun of a finished run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest(accelerator: Any, output_dir: Path) -> tuple[int, Path | None]:
    """Restore the newest complete checkpoint (model, optimizer, RNG, registered objects); returns (step, path)."""
    done = complete_checkpoints(output_dir)
    if not done:
        return 0, None
    path = done[-1]
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE).read_text())["step"]), path
