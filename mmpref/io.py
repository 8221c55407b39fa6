"""Atomic file writes (and the JSON-lines reader to match), shared by every job that must never leave half a
file behind (synth, demo, benchmarks), and owned output folders: a job writes only into a folder that is new,
empty or already its own, and deletes only what it wrote there.

Each write goes to a unique temp file in the target's folder, then ``os.replace`` swaps it in: readers see the old
file or the new one, and concurrent writers never share a temp file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmpref.errors import RunFolderError

OWNER_FILE = ".mmpref-owner.json"


def cache_root() -> Path:
    """Where mmpref keeps caches it can rebuild: ``$MMPREF_CACHE_DIR``, else ``~/.cache/mmpref``."""
    return Path(os.environ.get("MMPREF_CACHE_DIR") or Path.home() / ".cache" / "mmpref")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to (any writer: ``save_file``, ``savefig``, soundfile); it
    replaces ``path`` when the block ends, and is removed if the block fails. The temp name keeps the extension, so
    writers that go by it still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``path`` to fill; when the block ends it takes ``path``'s place (an older folder
    there is removed, or, with ``replace=False``, kept and ours dropped: the first writer wins a race). A failed
    block leaves no trace: ``path`` is complete or absent, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.replace(tmp, path)  # fails when a folder with files is already there
        except OSError:
            if not path.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # another writer got there first (perhaps between any check of ours and this line): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


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


# ----- owned folders ------------------------------------------------------------------------------------------------
def claim_folder(path: str | os.PathLike, owner: str, option: str,
                 legacy: Callable[[list[str]], bool] | None = None) -> Path:
    """Make ``path`` a folder ``owner`` (e.g. "mmpref demo") writes into, or refuse naming ``option``.

    A new or empty folder (hidden files aside) gets an owner file; a folder with ``owner``'s file is taken as it
    is; a folder whose entries ``legacy`` recognises (written before owner files existed) is adopted; anything
    else is refused, untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{option}: {path} is a file; give a folder")
    marker = path / OWNER_FILE
    if marker.exists():
        try:
            found = json.loads(marker.read_text()).get("owner")
        except (OSError, ValueError, AttributeError):
            found = None
        if found == owner:
            return path
        raise RunFolderError(f"{option}: {path} belongs to {found or 'another job'}, not {owner}; give another "
                             "folder")
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    if entries and not (legacy and legacy(entries)):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunFolderError(f"{option}: {path} is not empty ({shown}) and was not made by {owner}; give a new or "
                             "empty folder (nothing there is touched)")
    write_json_atomic(marker, {"owner": owner})
    return path


def remove_owned(path: str | os.PathLike, owner: str, patterns: Sequence[str]) -> list[str]:
    """Delete the entries of ``owner``'s folder that match ``patterns`` (what the job writes); return the names
    of the entries left alone. A folder ``owner`` does not own is refused, untouched."""
    path = Path(path)
    marker = path / OWNER_FILE
    try:
        found = json.loads(marker.read_text()).get("owner")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != owner:
        raise RunFolderError(f"{path} was not made by {owner} (no {OWNER_FILE} of its own): nothing deleted")
    kept = []
    for p in sorted(path.iterdir()):
        if p.name == OWNER_FILE:
            continue
        if any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            kept.append(p.name)
    return kept
