"""The rules of a training run's folder (``run.output_dir``): never mixed, never wiped.

- A new run needs a new or empty folder (hidden files such as ``.gitkeep`` aside, and caches an earlier, failed
  start left).
- A folder holding an mmpref run is resumed when ``run.resume`` is true (the default), but only if the run's
  saved config equals the new one except for keys that do not change what is trained (:data:`SAFE_TO_CHANGE`), and
  its data is the same; otherwise the launch is refused, listing what changed.
- ``run.overwrite: true`` starts over there: the files the earlier run wrote (:data:`RUN_FILES`) are removed,
  anything else in the folder is left alone.
- Nothing is written before everything is validated: :func:`inspect` only reads; :func:`commit` writes the new
  ``config.yaml`` and ``run.json`` (or removes the old run's files) once the model and data have loaded.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpref.config import TrainConfig, config_to_dict, save_config
from mmpref.errors import RunFolderError
from mmpref.io import write_json_atomic
from mmpref.yaml_config import read_yaml

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
# What a run writes into its folder (removed by overwrite); reference_cache is a cache keyed by its contents: kept
RUN_FILES = (RUN_FILE, CONFIG_FILE, "metrics.jsonl", "checkpoint-*", "final", ".final.*", "training_curves.png",
             "mmpref", "rollouts", "reference")
CACHES = ("reference_cache",)
# run.* keys that change how a run is driven or recorded, not what it computes
SAFE_TO_CHANGE = frozenset({"run.output_dir", "run.log_every", "run.save_every", "run.keep_checkpoints",
                            "run.eval_every", "run.num_workers", "run.report_to", "run.resume",
                            "run.overwrite", "model.cache_batch_size"})


@dataclass
class FolderPlan:
    out: Path
    mode: str  # "new" | "resume" | "overwrite"
    saved: dict | None = None  # the earlier run's run.json


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def inspect(cfg: TrainConfig) -> FolderPlan:
    """Decide what this launch does with ``run.output_dir``, reading only (see the module docstring)."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"run.output_dir: {out} is a file; give a folder (new or empty) for the run")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    legacy = (out / CONFIG_FILE).exists() and any(e == "metrics.jsonl" or e.startswith("checkpoint-") for e in entries)
    has_run = (out / RUN_FILE).exists() or legacy  # legacy: a run from before run.json existed
    if not has_run:
        foreign = [e for e in entries if not _matches(e, CACHES) and not e.startswith(".")]  # .gitkeep & co
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RunFolderError(f"run.output_dir: {out} is not empty ({len(foreign)} entries: {shown}) and holds "
                                 "no mmpref run; give a new or empty folder (nothing there is touched)")
        return FolderPlan(out, "new")
    if cfg.run.overwrite:
        return FolderPlan(out, "overwrite")
    if not cfg.run.resume:
        raise RunFolderError(f"run.output_dir: {out} holds an earlier run; resume it with run.resume=true, start "
                             "over with run.overwrite=true (removes that run's files only), or give a new folder")
    saved = _read_run(out)
    changed = changed_keys(_saved_config(out), config_to_dict(cfg))
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        old, new = _saved_config(out), config_to_dict(cfg)
        shown = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in unsafe[:4])
        raise RunFolderError(f"run.output_dir: {out} holds a run with another config ({shown}"
                             f"{'; ...' if len(unsafe) > 4 else ''}); resuming would mix the two. Use a new "
                             "run.output_dir, or run.overwrite=true to start over there")
    return FolderPlan(out, "resume", saved)


def check_data(plan: FolderPlan, fingerprint: str) -> None:
    """On resume, the data must be what the run started with (the adapter's fingerprint of it)."""
    before = (plan.saved or {}).get("data_fingerprint")
    if plan.mode == "resume" and before and fingerprint and before != fingerprint:
        raise RunFolderError(f"run.output_dir: {plan.out} holds a run trained on other data (the data at "
                             "data.path changed since it started); resuming would mix the two. Use a new "
                             "run.output_dir, or run.overwrite=true to start over there")


def commit(plan: FolderPlan, cfg: TrainConfig, data_fingerprint: str) -> None:
    """Main process, once models and data are loaded and checked: claim the folder for this run."""
    out = plan.out
    if plan.mode == "overwrite":
        for p in sorted(out.iterdir()):
            if _matches(p.name, RUN_FILES):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)  # on resume only safe keys can differ: it records the latest values
    if plan.mode != "resume" or not (out / RUN_FILE).exists():
        from mmpref import __version__

        write_json_atomic(out / RUN_FILE, {"format": 1, "mmpref": __version__, "data_fingerprint": data_fingerprint})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (a missing key counts as changed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += changed_keys(old.get(k), new.get(k), key) if k in old and k in new else [key]
        return out
    if isinstance(old, float) or isinstance(new, float):
        try:
            return [] if float(old) == float(new) else [prefix]
        except (TypeError, ValueError):
            return [prefix]
    return [] if old == new else [prefix]


def _get(d: Any, key: str) -> Any:
    for k in key.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _saved_config(out: Path) -> dict:
    try:
        saved = read_yaml(out / CONFIG_FILE)
        if "train" in saved and "run" not in saved:  # written before the section was renamed
            saved["run"] = saved.pop("train")
        return saved
    except Exception as e:  # noqa: BLE001 - any unreadable config means we cannot tell what the run was
        raise RunFolderError(f"run.output_dir: {out / CONFIG_FILE} cannot be read ({e}); cannot tell which run "
                             "this folder holds. Use a new run.output_dir, or run.overwrite=true") from None


def _read_run(out: Path) -> dict:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except FileNotFoundError:
        return {}  # a run from before run.json existed: config.yaml alone identifies it
    except (OSError, ValueError) as e:
        raise RunFolderError(f"run.output_dir: {out / RUN_FILE} is unreadable ({e}); use a new run.output_dir, "
                             "or run.overwrite=true") from None
