"""Reading a data source into a ``datasets.Dataset``, for both modalities, with errors a user can act on.

A source is a JSON / JSON-lines / Parquet / CSV file, a folder of such files, a folder written by
``Dataset.save_to_disk`` (``mmpref synth`` writes one), or a hub dataset id. Failures name the file and, for text
formats, the line: an empty file, a line that is not JSON, a missing split. :class:`Table` keeps how rows map to
lines, so row checks report ``line N`` (1-based, as an editor shows it) for JSONL and CSV files and ``row N``
(1-based) otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from mmpref.errors import DataError
from mmpref.sources import check_source, loading

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FORMATS = ("auto", "json", "jsonl", "parquet", "csv")


@dataclass
class Table:
    data: datasets.Dataset
    source: str  # the file or folder, as given
    file: Path | None = None  # the one local file the rows come from, when they do

    def label(self, i: int) -> str:
        """Where row ``i`` (0-based) is: ``line N`` in a JSONL / CSV file, else ``row N``; both 1-based."""
        lines = self._lines()
        return f"line {lines[i]}" if lines is not None and i < len(lines) else f"row {i + 1}"

    def labels(self, rows: list[int], limit: int = 5) -> str:
        shown = [self.label(i) for i in rows[:limit]]
        return ", ".join(shown) + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")

    def _lines(self) -> list[int] | None:
        if not hasattr(self, "_line_cache"):
            self._line_cache = _record_lines(self.file) if self.file is not None else None
        return self._line_cache


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


@dataclass(frozen=True)
class HubOptions:
    """What ``datasets.load_dataset`` takes beside a hub id (or a folder in the hub's layout): ``subset`` (its
    ``name``, a configuration), ``revision`` (branch, tag or commit) and ``data_dir`` (a folder inside it)."""

    subset: str | None = None
    revision: str | None = None
    data_dir: str | None = None

    def kwargs(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.subset), ("revision", self.revision), ("data_dir", self.data_dir))
                if v is not None}


def load_table(path: str, split: str = "train", fmt: str = "auto", key: str = "data.path",
               what: str = "a JSON/JSONL/Parquet/CSV file, a folder of them, or a hub dataset id",
               hub: HubOptions | None = None) -> Table:
    """One split of ``path`` (see the module docstring); errors name ``key`` and the file. ``hub`` options apply
    to hub ids and folders in the hub's layout (a README with ``configs:``, or data files in subfolders)."""
    if fmt not in FORMATS:
        raise DataError(f"data.format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    check_source(path, key, what)
    local = Path(os.path.expanduser(path))
    extra = (hub or HubOptions()).kwargs()
    if extra and (local.is_file() or (local.is_dir() and is_saved_dataset(local))):
        names = ", ".join(f"data.{'subset' if k == 'name' else k}" for k in extra)
        raise DataError(f"{path}: {names} only apply to hub datasets and folders in the hub's layout, not to a "
                        f"{'file' if local.is_file() else 'save_to_disk folder'}; remove {names}")
    if local.is_file():
        table = Table(_load_file(local, fmt), path, local)
    elif local.is_dir() and is_saved_dataset(local):
        table = Table(_load_saved(local, split), path)
    elif local.is_dir():
        with loading(key, path, what):
            if fmt != "auto":
                sub = local / extra.pop("data_dir") if "data_dir" in extra else local
                ds = datasets.load_dataset(BUILDERS["." + fmt], data_dir=str(sub), split=split, **extra)
            else:
                ds = datasets.load_dataset(str(local), split=split, **extra)
        table = Table(ds, path)
    else:
        with loading(key, path, what):
            table = Table(datasets.load_dataset(path, split=split, **extra), path)
    if len(table.data) == 0:
        raise DataError(f"{path}: no rows (the {'file' if local.is_file() else 'split ' + repr(split)} is empty); "
                        "point data.path at a file with data")
    return table


def _load_file(path: Path, fmt: str) -> datasets.Dataset:
    builder = BUILDERS.get(path.suffix.lower()) if fmt == "auto" else BUILDERS["." + fmt]
    if builder is None:
        raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; use one of "
                        f"{', '.join(sorted(BUILDERS))} or set data.format")
    if path.stat().st_size == 0 or (builder != "parquet" and not path.read_bytes().strip()):
        raise DataError(f"{path}: the file is empty (no rows); point data.path at a file with data")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as e:  # noqa: BLE001 - datasets wraps parser errors in several types: find the bad line
        raise DataError(f"{path}: {_diagnose(path, builder, e)}") from e


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a parser failure with its traceback before raising; we report it in one line instead."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _diagnose(path: Path, builder: str, err: Exception) -> str:
    """Which line of a text file is malformed (datasets only says "Invalid encoding in string" or similar)."""
    if builder == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
            whole_ok = True
        except ValueError:
            whole_ok = False
        if not whole_ok:
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        return f"line {n}: not valid JSON ({e.msg}); every line must be one JSON object"
                    if not isinstance(row, dict):
                        return f"line {n}: a JSON {type(row).__name__}, expected an object {{\"prompt\": ...}}"
    if builder == "parquet":
        return f"not a readable Parquet file ({type(err).__name__}: {_first_line(err)})"
    return f"cannot be read as {builder.upper()} ({type(err).__name__}: {_first_line(err)}); check its format"


def _first_line(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else ""


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: a save_to_disk folder that cannot be read ({type(e).__name__}: "
                        f"{_first_line(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(ds)} (set data.split)")
        ds = ds[split]
    return ds


def _record_lines(path: Path) -> list[int] | None:
    """The 1-based line on which each record starts, for JSONL and CSV files (None for other formats)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_document(path)):
        with open(path, encoding="utf-8", errors="replace") as f:
            return [n for n, line in enumerate(f, start=1) if line.strip()]
    if suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            starts, start = [], 1
            for i, _ in enumerate(reader):
                if i > 0:  # the header is line 1
                    starts.append(start)
                start = reader.line_num + 1
            return starts
    return None


def _is_json_document(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except ValueError:
        return False


def first_row(table: Table) -> dict[str, Any] | None:
    return table.data[0] if len(table.data) else None
