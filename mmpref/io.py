"""Atomic file writes (and the JSON-lines reader to match), shared by every job that must never leave half a
file behind (synth, demo, benchmarks).

Each write goes to a unique temp file in the target's folder, then ``os.replace`` swaps it in: readers see the old
file or the new one, and concurrent writers never share a temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """JSON with numpy scalars and paths converted (reports hold both)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict], sort_keys: bool = False) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, sort_keys=sort_keys) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
