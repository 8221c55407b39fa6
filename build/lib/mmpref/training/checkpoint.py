"""Atomic, verified, resumable checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is written into ``checkpoint-<step>.tmp``; then the main process writes ``trainer_state.json`` and the
``complete`` marker, which lists every file with its size and sha256, and only then renames the folder to
``checkpoint-<step>``. A crash mid-write leaves a ``.tmp`` folder that resume ignores.

Resuming verifies the newest checkpoint against its marker; a checkpoint with a missing, truncated or altered file is
skipped with a warning naming the file, and the newest intact one is used (an error when none is).

A checkpoint folder is data: nothing in it is unpickled into arbitrary objects. accelerate writes the model
(safetensors), the optimizer and its RNG file (both read back with ``weights_only=True``); the scheduler and the
losses' states (BCO's running shift) go into ``trainer_state.json`` and ``loss_state.safetensors`` instead of
accelerate's ``custom_checkpoint_*.pkl`` (which it loads with ``weights_only=False``), and every process's RNG
state into ``rng_state_<rank>.safetensors``, restored strictly (accelerate skips an unreadable RNG file silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmpref.errors import CheckpointError

logger = logging.getLogger(__name__)

MARKER = "complete"
STATE = "trainer_state.json"
LOSS_STATE = "loss_state.safetensors"
MANIFEST_VERSION = 1


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints with a ``complete`` marker, oldest first (names are zero-padded, so name order is step order)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and not p.suffix and (p / MARKER).exists()]
    return sorted(found)


# ----- saving -------------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator: Any, output_dir: Path, step: int, state: dict, keep: int,
                    scheduler: Any, loss_states: dict[str, torch.Tensor]) -> Path:
    """Every process calls this (each writes its RNG files); the main process hashes and commits it."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file(_rng_state(), str(tmp / f"rng_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if loss_states:
            save_file({k: v.detach().cpu().contiguous() for k, v in loss_states.items()}, str(tmp / LOSS_STATE))
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "scheduler": scheduler.state_dict()}, indent=1))
        (tmp / MARKER).write_text(json.dumps({"version": MANIFEST_VERSION, "files": _manifest(tmp)}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after resuming from an older, intact checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _manifest(folder: Path) -> dict[str, list]:
    return {str(p.relative_to(folder)): [p.stat().st_size, _sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----- verifying and loading ----------------------------------------------------------------------------------------
def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None. Checkpoints from before manifests pass."""
    try:
        text = (path / MARKER).read_text()
    except OSError as e:
        return f"{MARKER}: unreadable ({e.strerror})"
    if not text.strip():
        return None  # written by mmpref before checkpoints listed their files: nothing to check against
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER}: not a file list (damaged)"
    for rel, (size, digest) in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel}: missing"
        if f.stat().st_size != size:
            return f"{rel}: {f.stat().st_size} bytes, expected {size} (truncated or replaced)"
        if _sha256(f) != digest:
            return f"{rel}: contents differ from when it was saved (sha256 mismatch)"
    try:
        json.loads((path / STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE}: unreadable"
    return None


def newest_intact(output_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are named in a warning. Raises if none is intact."""
    found = complete_checkpoints(output_dir)
    broken = []
    for path in reversed(found):
        reason = verify(path)
        if reason is None:
            if broken:
                logger.warning("skipping broken checkpoint(s) %s; resuming from %s", "; ".join(broken), path.name)
            return path
        broken.append(f"{path.name} ({reason})")
    if broken:
        raise CheckpointError(f"{output_dir}: no intact checkpoint to resume from: {'; '.join(broken)}. Restore "
                              "them, or start over with run.overwrite=true (removes this run's files)")
    return None


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any, losses: list[Any]) -> int:
    """Restore model, optimizer, scheduler, losses' states and this process's RNG from ``path``; returns its step."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - verified files that still do not load: name the checkpoint
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "start over with run.overwrite=true or remove this checkpoint") from e
    state = json.loads((path / STATE).read_text())
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
        loss_states = load_file(str(path / LOSS_STATE)) if (path / LOSS_STATE).exists() else {}
        for i, loss in enumerate(losses):
            loss.load_state_dict(_unflatten(loss_states, i))
    else:
        _load_legacy_custom_states(path, [scheduler, *losses])
    rng = path / f"rng_state_{accelerator.process_index}.safetensors"
    if rng.exists():
        _set_rng_state(load_file(str(rng)), rng)
    return int(state["step"])


def flatten_loss_states(losses: list[Any]) -> dict[str, torch.Tensor]:
    """Every loss's tensor state as one flat dict (``<loss index>/<term key>/<name>``) for safetensors."""
    out = {}
    for i, loss in enumerate(losses):
        for term, tensors in loss.state_dict().items():
            for name, t in tensors.items():
                out[f"{i}/{term}/{name}"] = torch.as_tensor(t)
    return out


def _unflatten(flat: dict[str, torch.Tensor], index: int) -> dict[str, dict[str, torch.Tensor]]:
    """The state of loss ``index`` from :func:`flatten_loss_states`' flat dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        i, term, name = key.split("/", 2)
        if int(i) == index:
            out.setdefault(term, {})[name] = t
    return out


def _load_legacy_custom_states(path: Path, objects: list[Any]) -> None:
    """Checkpoints written before trainer_state.json held the scheduler: accelerate's ``custom_checkpoint_*.pkl``,
    read as plain data only (``weights_only=True``: a pickle that asks for anything else is refused)."""
    for i, obj in enumerate(objects):
        f = path / f"custom_checkpoint_{i}.pkl"
        if not f.exists():
            continue
        try:
            obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: refused: not plain tensors and numbers ({type(e).__name__}); "
                                  "mmpref does not load pickled objects from a checkpoint folder") from e


# ----- RNG state as tensors -----------------------------------------------------------------------------------------
def _rng_state() -> dict[str, torch.Tensor]:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python_version": torch.tensor([version]),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss]),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _set_rng_state(s: dict[str, torch.Tensor], source: Path) -> None:
    try:
        gauss = float(s["python_gauss"][0])
        random.setstate((int(s["python_version"][0]), tuple(int(x) for x in s["python_mt"].tolist()),
                         None if np.isnan(gauss) else gauss))
        pos, has_gauss = (int(x) for x in s["numpy_pos"].tolist())
        np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                             float(s["numpy_gauss"][0])))
        torch.set_rng_state(s["torch_cpu"])
        cuda = [s[k] for k in sorted(k for k in s if k.startswith("torch_cuda_"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: not a valid RNG state ({type(e).__name__}: {e}); a run resumed without "
                              "it would not reproduce the uninterrupted one") from e
