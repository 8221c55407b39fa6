"""Streaming an audio preference set too large to download and convert first (Audio-Alpaca: 9.7 GB of audio).

``datasets.load_dataset(..., streaming=True)`` reads the source row by row (hub files over HTTP, local files
directly) without the arrow copy that a normal load writes beside the download, so the set costs its size on disk
once instead of twice. Each row is written, as it arrives, into a folder under the cache root: embedded audio bytes
to ``audio/`` as they are (no re-encoding), the row itself to ``rows.jsonl`` with relative paths in their place. The
folder appears atomically when the stream ends; later runs read it like any local JSONL file (and the latent cache
is built from it as from any other), so an interrupted stream starts again and a finished one is never re-read.

Only ``prompt``, ``chosen``, ``rejected`` and ``strategy`` are kept. ``max_groups`` also bounds the rows read (each
row makes at least one group), so a first look at a huge set reads only its head.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmpref.data.tables import BUILDERS, HubOptions
from mmpref.errors import DataError
from mmpref.io import atomic_dir, cache_root
from mmpref.sources import check_source, loading

ROWS = "rows.jsonl"
COLUMNS = ("prompt", "chosen", "rejected", "strategy")


def streamed_copy(path: str, split: str, hub: HubOptions, audio_root: str | None, max_rows: int | None) -> Path:
    """The ``rows.jsonl`` of the source's streamed copy (made now unless an earlier run made it)."""
    check_source(path, "data.path", "a hub dataset id, a folder or a JSON/JSONL/Parquet/CSV file")
    local = Path(os.path.expanduser(path))
    key = [path, split, hub.kwargs(), audio_root, max_rows]
    if local.exists():  # a changed local source is a new copy (hub sources: pin data.revision to be exact)
        key.append(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file()))
    target = cache_root() / "streamed" / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    if not (target / ROWS).is_file():
        with atomic_dir(target, replace=False) as tmp:
            _copy(_open_stream(path, local, split, hub), tmp, _root_for_paths(local, audio_root), max_rows, path)
    return target / ROWS


def _open_stream(path: str, local: Path, split: str, hub: HubOptions) -> Any:
    import datasets

    what = "a hub dataset id, a folder or a JSON/JSONL/Parquet/CSV file"
    with loading("data.path", path, what):
        if local.is_file():
            builder = BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: cannot tell the format from the extension {local.suffix!r}; use one of "
                                f"{', '.join(sorted(BUILDERS))}")
            ds = datasets.load_dataset(builder, data_files={split: str(local)}, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(str(local) if local.is_dir() else path, split=split, streaming=True,
                                       **hub.kwargs())
    return _undecoded(ds)


def _undecoded(ds: Any) -> Any:
    """Audio columns as ``{"bytes", "path"}`` (datasets' decoder needs torchcodec/FFmpeg, which we do not use)."""
    from datasets import Audio, List

    for name, feat in (ds.features or {}).items():
        if isinstance(feat, Audio):
            ds = ds.cast_column(name, Audio(decode=False))
        elif isinstance(feat, List) and isinstance(feat.feature, Audio):
            ds = ds.cast_column(name, List(Audio(decode=False)))
    return ds


def _root_for_paths(local: Path, audio_root: str | None) -> Path | None:
    """What relative audio paths in the rows are relative to (as in a normal load): ``data.audio_root``, else the
    local source's folder; None for a hub source (its paths stay as written)."""
    if audio_root:
        return Path(audio_root)
    if local.exists():
        return local.parent if local.is_file() else local
    return None


def _copy(ds: Any, out: Path, root: Path | None, max_rows: int | None, path: str) -> None:
    (out / "audio").mkdir()
    n = 0
    with open(out / ROWS, "w") as f:
        for i, row in enumerate(tqdm(ds, desc="stream: rows", unit="row", total=max_rows)):
            if max_rows is not None and i >= max_rows:
                break
            missing = [c for c in COLUMNS[:3] if c not in row]
            if missing:
                raise DataError(f"data.path {path!r}: row {i + 1} has no column(s) {missing}; found {sorted(row)}")
            kept = {c: row[c] for c in COLUMNS if row.get(c) is not None}
            for col in ("chosen", "rejected"):
                cell = kept[col]
                kept[col] = ([_audio_cell(v, out, root, f"{i:08d}_{col}_{j}") for j, v in enumerate(cell)]
                             if isinstance(cell, list) else _audio_cell(cell, out, root, f"{i:08d}_{col}"))
            f.write(json.dumps(kept) + "\n")
            n += 1
    if n == 0:
        raise DataError(f"data.path {path!r}: the stream has no rows; point data.path at a set with data")


def _audio_cell(cell: Any, out: Path, root: Path | None, name: str) -> str:
    """An audio cell as a path in the copy: embedded bytes are written to ``audio/`` (relative path), a path is
    made absolute against ``root`` so that it still points at its file from the cache."""
    if isinstance(cell, dict) and cell.get("bytes"):
        suffix = Path(cell.get("path") or "").suffix or ".wav"
        rel = Path("audio") / f"{name}{suffix}"
        (out / rel).write_bytes(cell["bytes"])
        return str(rel)
    p = cell.get("path") if isinstance(cell, dict) else cell
    if not isinstance(p, str) or not p:
        return p  # left for the index to report with the row
    p = os.path.expanduser(p)
    return str((root / p).resolve()) if root is not None and not os.path.isabs(p) else p


__all__ = ["streamed_copy"]
