"""Audio preference sets: loading, validation, a tiny synthetic set, and the on-disk tensor cache.

Two schemas, both normalised to *groups* (one prompt, one winner, ``K`` losers):

* ``audio_alpaca``: one pair per row, columns ``prompt, chosen, rejected[, strategy]`` (Tango 2's Audio-Alpaca);
  ``group_pairs`` merges rows sharing ``(prompt, chosen)`` into one group.
* ``grouped``: ``prompt, chosen, rejected`` with ``rejected`` a list (CSV: a JSON-encoded list).

An audio cell is a path (relative paths resolve against ``audio_root``, default: the data file's folder) or a
``datasets.Audio(decode=False)`` dict ``{"bytes", "path"}``. Audio is decoded with soundfile only
(:func:`mmpref.audio.load_audio`), never with datasets' own decoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpref.audio import AudioFileError, load_audio, resample
from mmpref.data.stream import streamed_copy
from mmpref.data.tables import HubOptions, Table, load_table
from mmpref.errors import DataError, MmprefError
from mmpref.io import atomic_dir, cache_root
from mmpref.toy.tones import make_tiny_preference_set
from mmpref.yaml_config import check

SCHEMAS = ("auto", "audio_alpaca", "grouped")
DATASET_HINT = "mmpref.json"  # in a save_to_disk folder: {"audio_root": "<relative to the folder>"}


@dataclass
class AudioPreferenceDataConfig:
    """The ``data:`` section of a diffusion run.

    path: a local file (json/jsonl/parquet/csv), a folder of such files, a hub dataset id, or ``tiny:N[:K]``
        (a synthetic set of N groups with K losers of 1 s tones, generated once under the cache root).
    duration_s: clip length the model trains on; waves are cropped / zero-padded to it (Tango: 10 s or 10.24 s).
    num_losers: K. None: every group must have the same K. An int: groups with more losers are split into
        groups of K losers (K=1 gives Tango 2's pairs); groups with fewer are invalid. 0: winners only (losers, if
        any, are ignored; rows may have ``rejected: []``), for winner-only objectives such as an ``sft`` phase.
    length_tolerance_s: clips whose length differs from ``duration_s`` by more are invalid (None: no check).
    skip_invalid: False (default) refuses to start when any clip is missing / corrupt / silent / of the wrong
        length (all of them are reported with their paths); True drops the groups that use them.
    cache_dir: where latents and text encodings are cached; default ``$MMPREF_CACHE_DIR`` (or
        ``~/.cache/mmpref``) ``/diffusion/<hash of the data source>``.
    streaming: read the source row by row (datasets' streaming mode) into a copy under the cache root instead of
        downloading and converting it first: for sets too large to hold twice (:mod:`mmpref.data.stream`). With
        ``max_groups``, at most that many rows are read.
    """

    path: str = "tiny:16"
    schema: str = "auto"
    split: str = "train"
    subset: str | None = None  # hub datasets (and folders in the hub layout): the configuration (load_dataset's name)
    revision: str | None = None  # hub datasets: branch, tag or commit
    data_dir: str | None = None  # hub datasets: a folder inside the repository
    audio_root: str | None = None
    duration_s: float = 10.0
    num_losers: int | None = None
    group_pairs: bool = False
    max_groups: int | None = None
    skip_invalid: bool = False
    length_tolerance_s: float | None = 0.5
    silence_threshold: float = 1e-4  # peak |x| at or below this counts as silent
    cache_dir: str | None = None
    streaming: bool = False

    def __post_init__(self) -> None:
        check(self.schema in SCHEMAS, "schema", f"must be one of {list(SCHEMAS)}, got {self.schema!r}")
        check(self.duration_s > 0, "duration_s", f"must be > 0, got {self.duration_s!r}")
        check(self.num_losers is None or self.num_losers >= 0, "num_losers", f"must be null or >= 0, got "
              f"{self.num_losers!r}")


# ---------------------------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class Clip:
    """One audio file: ``path`` on disk, or embedded bytes at ``table[row][column]`` (item ``item`` of a list)."""

    key: str
    path: str | None = None
    row: int = -1
    column: str = ""
    item: int = -1


@dataclass
class PreferenceIndex:
    """Unique prompts and clips, and groups ``(prompt id, (winner clip id, loser clip ids...))``."""

    prompts: list[str]
    clips: list[Clip]
    groups: list[tuple[int, tuple[int, ...]]]
    table: Any = None  # the datasets.Dataset, for embedded audio bytes
    fingerprint: str = ""  # of the data source (file content or datasets fingerprint) and the grouping
    dropped: dict[str, int] = field(default_factory=dict)
    # (prompt id, winner clip id) -> the rows' `strategy` (Audio-Alpaca's column; "mixed" when rows merged by
    # group_pairs disagree); empty without the column. Metrics are reported per strategy.
    tags: dict[tuple[int, int], str] = field(default_factory=dict)

    def tag(self, group: tuple[int, tuple[int, ...]]) -> str | None:
        return self.tags.get((group[0], group[1][0]))

    @property
    def num_losers(self) -> int:
        return len(self.groups[0][1]) - 1 if self.groups else 0

    def read(self, clip_id: int, sample_rate: int) -> np.ndarray:
        """The clip as float32 mono at ``sample_rate`` (raises :class:`AudioFileError` naming the clip)."""
        clip = self.clips[clip_id]
        if clip.path is not None:
            return load_audio(clip.path, sample_rate)
        cell = self.table[clip.row][clip.column]
        cell = cell[clip.item] if clip.item >= 0 else cell
        try:
            data, sr = sf.read(io.BytesIO(cell["bytes"]), dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioFileError(f"cannot read audio {clip.key!r}: {e}") from e
        return np.ascontiguousarray(resample(data.mean(axis=1), sr, sample_rate), dtype=np.float32)


def load_preference_index(cfg: AudioPreferenceDataConfig) -> PreferenceIndex:
    """Read the data source and build the group index (no audio is decoded here).

    Rows whose loser is the winner's own file are refused (by path here; by content when the clips are read)."""
    source, root, source_fp = _load_table(cfg)
    table = source.data
    schema = _detect_schema(table, cfg.schema)
    builder = _IndexBuilder(source, root)
    groups: list[tuple[int, list[int]]] = []
    by_pair: dict[tuple[int, int], int] = {}
    same: list[int] = []
    tags: dict[tuple[int, int], str] = {}
    for row_id, row in enumerate(table):
        prompt = builder.prompt(row["prompt"], row_id)
        winner = builder.clip(row["chosen"], row_id, "chosen", -1)
        losers = _as_list(row["rejected"], source.label(row_id)) if schema == "grouped" else [row["rejected"]]
        item = (lambda j: j) if schema == "grouped" else (lambda j: -1)
        loser_ids = [builder.clip(v, row_id, "rejected", item(j)) for j, v in enumerate(losers)]
        if winner in loser_ids:
            same.append(row_id)
            continue
        if row.get("strategy") is not None:
            key, tag = (prompt, winner), str(row["strategy"])
            tags[key] = tag if tags.get(key, tag) == tag else "mixed"
        if cfg.group_pairs and (prompt, winner) in by_pair:
            groups[by_pair[(prompt, winner)]][1].extend(loser_ids)
            continue
        by_pair[(prompt, winner)] = len(groups)
        groups.append((prompt, [winner, *loser_ids]))
    if same and not cfg.skip_invalid:
        raise DataError(f"{cfg.path}: {len(same)} row(s) whose rejected audio is the chosen file itself "
                        f"({source.labels(same)}); fix them or set data.skip_invalid=true to drop them")
    final, dropped = _fix_group_size(groups, cfg.num_losers, cfg.skip_invalid)
    dropped["rows_loser_is_winner"] = len(same)
    if cfg.max_groups is not None:
        final = final[: cfg.max_groups]
    fp = _hash([source_fp, schema, cfg.group_pairs, cfg.num_losers, cfg.max_groups, root and str(root)])
    return PreferenceIndex(builder.prompts, builder.clips, final, table, fp, dropped, tags)


class _IndexBuilder:
    def __init__(self, source: Table, root: Path | None):
        self.source, self.table, self.root = source, source.data, root
        self.prompts: list[str] = []
        self.clips: list[Clip] = []
        self._prompt_ids: dict[str, int] = {}
        self._clip_ids: dict[str, int] = {}

    def prompt(self, text: Any, row: int) -> int:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{self.source.source}: {self.source.label(row)}: 'prompt' must be a non-empty string, "
                            f"got {text!r}")
        return _intern(self._prompt_ids, self.prompts, text, text)

    def clip(self, cell: Any, row: int, column: str, item: int) -> int:
        clip = self._to_clip(cell, row, column, item)
        return _intern(self._clip_ids, self.clips, clip.key, clip)

    def _to_clip(self, cell: Any, row: int, column: str, item: int) -> Clip:
        if isinstance(cell, dict) and cell.get("bytes"):
            # embedded audio is not deduplicated (hashing every clip's bytes would cost a full read per run)
            return Clip(key=f"{column}[{row}]" + (f"[{item}]" if item >= 0 else ""), row=row, column=column,
                        item=item)
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not isinstance(path, str) or not path:
            raise DataError(f"{self.source.source}: {self.source.label(row)}: {column!r} must be an audio path or "
                            f"an Audio dict, got {cell!r}")
        resolved = Path(path) if Path(path).is_absolute() or self.root is None else self.root / path
        resolved = os.path.normpath(resolved)
        return Clip(key=resolved, path=resolved)


def _intern(ids: dict[str, int], items: list, key: str, value: Any) -> int:
    """The id of ``key``, appending ``value`` to ``items`` the first time it is seen."""
    if key not in ids:
        ids[key] = len(items)
        items.append(value)
    return ids[key]


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # CSV: a JSON-encoded list
        except ValueError as e:
            raise DataError(f"{where}: 'rejected' is not a valid JSON list ({e})") from None
    if not isinstance(value, list | tuple):
        raise DataError(f"{where}: grouped schema: 'rejected' must be a list, got {type(value).__name__}")
    return list(value)


def _fix_group_size(groups: list[tuple[int, list[int]]], k: int | None,
                    skip_invalid: bool) -> tuple[list[tuple[int, tuple[int, ...]]], dict[str, int]]:
    """Every group gets exactly K losers (see ``AudioPreferenceDataConfig.num_losers``)."""
    if not groups:
        raise ValueError("the preference set has no rows")
    sizes = sorted({len(m) - 1 for _, m in groups})
    if k is None:
        if len(sizes) > 1:
            raise ValueError(f"groups have different numbers of losers {sizes}: set data.num_losers to one K")
        k = sizes[0]
    if k == 0:  # winners only
        return [(prompt, (members[0],)) for prompt, members in groups], {"losers_left_over": 0}
    out, short, leftover = [], [], 0
    for i, (prompt, (winner, *losers)) in enumerate(groups):
        if len(losers) < k:
            short.append(i)
            continue
        for s in range(0, len(losers) - k + 1, k):
            out.append((prompt, (winner, *losers[s: s + k])))
        leftover += len(losers) % k
    if short and not skip_invalid:
        raise ValueError(f"{len(short)} group(s) have fewer than num_losers={k} losers (groups {short[:20]}"
                         f"{' ...' if len(short) > 20 else ''}); set data.skip_invalid=true to drop them")
    return out, {"groups_too_few_losers": len(short), "losers_left_over": leftover}


def _load_table(cfg: AudioPreferenceDataConfig) -> tuple[Table, Path | None, str]:
    """(the table with audio undecoded, the audio root, a fingerprint of the source)."""
    src = cfg.path
    hub = HubOptions(cfg.subset, cfg.revision, cfg.data_dir)
    if src.startswith("tiny:"):
        src = str(_tiny_source(src))
    elif cfg.streaming:  # a local copy, made row by row; read below like any JSONL file
        src = str(streamed_copy(src, cfg.split, hub, cfg.audio_root, cfg.max_groups))
        hub = HubOptions()
    what = "a JSON/JSONL/Parquet/CSV file, a dataset folder, a hub id or tiny:N[:K]"
    source = load_table(src, cfg.split, key="data.path", what=what, hub=hub)
    path = Path(src)
    if source.file is not None:
        source_fp, default_root = _file_hash(path), path.parent
    else:
        source_fp, default_root = source.data._fingerprint, (_saved_audio_root(path) if path.is_dir() else None)
    source.data = _undecode_audio(source.data)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in source.data.column_names]
    if missing:
        raise DataError(f"data.path {cfg.path!r}: missing column(s) {missing}; found {source.data.column_names}")
    # a streamed copy's paths are relative to the copy, or already absolute (audio_root was applied when copying)
    root = Path(cfg.audio_root) if cfg.audio_root and not cfg.streaming else default_root
    return source, root, source_fp


def _saved_audio_root(folder: Path) -> Path:
    """Audio paths in a folder dataset are relative to it, unless it says otherwise: ``mmpref synth`` writes
    ``dataset/`` beside the audio and records ``audio_root`` (relative to the dataset folder) in mmpref.json."""
    try:
        hint = json.loads((folder / DATASET_HINT).read_text())["audio_root"]
        return (folder / hint).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return folder


def _undecode_audio(table: Any) -> Any:
    """Cast Audio columns to ``decode=False``: datasets' decoder needs torchcodec/FFmpeg, which we do not use."""
    from datasets import Audio, List

    for name, feat in table.features.items():
        if isinstance(feat, Audio):
            table = table.cast_column(name, Audio(decode=False))
        elif isinstance(feat, List) and isinstance(feat.feature, Audio):
            table = table.cast_column(name, List(Audio(decode=False)))
    return table


def _detect_schema(table: Any, schema: str) -> str:
    if schema != "auto":
        return schema
    first = table[0]["rejected"] if len(table) else None
    is_list = isinstance(first, list) or (isinstance(first, str) and first.lstrip().startswith("["))
    return "grouped" if is_list else "audio_alpaca"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class AudioIssue:
    key: str  # the path (or the embedded cell)
    reason: str


class InvalidAudioError(MmprefError, ValueError):
    """Raised before training when clips are unusable; ``issues`` lists every one of them."""

    def __init__(self, issues: list[AudioIssue], total: int):
        self.issues = issues
        super().__init__(format_issues(issues, total, one_line=True) + "; fix or remove them, or set "
                         "data.skip_invalid=true to drop the groups that use them")


def format_issues(issues: list[AudioIssue], total: int, one_line: bool = False, show: int = 5) -> str:
    """Counts per kind and the files; ``one_line``: the first ``show`` files only, for an error message."""
    kinds: dict[str, int] = {}
    for i in issues:
        kind = i.reason.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    head = f"{len(issues)} of {total} audio files are invalid ({summary})"
    if one_line:
        listed = "; ".join(f"{i.key}: {i.reason}" for i in issues[:show])
        return f"{head}: {listed}" + (f"; ... ({len(issues) - show} more)" if len(issues) > show else "")
    return "\n".join([head + ":", *(f"  {i.key}: {i.reason}" for i in issues)])


def check_clip(wave: np.ndarray, sample_rate: int, cfg: AudioPreferenceDataConfig) -> str | None:
    """Why a decoded clip is unusable, or None."""
    if wave.size == 0:
        return "empty (0 samples)"
    if not np.isfinite(wave).all():
        return "corrupt (NaN or inf samples)"
    peak = float(np.abs(wave).max())
    if peak <= cfg.silence_threshold:
        return f"silent (peak {peak:.2g})"
    seconds = wave.shape[-1] / sample_rate
    if cfg.length_tolerance_s is not None and abs(seconds - cfg.duration_s) > cfg.length_tolerance_s:
        return f"wrong length ({seconds:.2f} s, expected {cfg.duration_s} s +- {cfg.length_tolerance_s})"
    return None


def read_and_check(index: PreferenceIndex, clip_id: int, sample_rate: int,
                   cfg: AudioPreferenceDataConfig) -> tuple[np.ndarray | None, str | None]:
    """(wave, None) or (None, reason)."""
    clip = index.clips[clip_id]
    if clip.path is not None and not os.path.exists(clip.path):
        return None, "missing (no such file)"
    try:
        wave = index.read(clip_id, sample_rate)
    except AudioFileError as e:
        return None, f"corrupt ({str(e.__cause__ or e).splitlines()[0]})"
    reason = check_clip(wave, sample_rate, cfg)
    return (None, reason) if reason else (wave, None)


def audio_digest(wave: np.ndarray | None) -> str:
    """A hash of decoded samples ("" for an unreadable clip): the same audio under two names has the same digest."""
    return "" if wave is None else hashlib.sha1(np.ascontiguousarray(wave).tobytes()).hexdigest()


def fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Crop or zero-pad the last dim to ``n`` samples (Tango crops from the start and pads at the end)."""
    return wave[..., :n] if wave.shape[-1] >= n else torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))


def audio_stats_fingerprint(index: PreferenceIndex) -> str:
    """Size and mtime of every audio file on disk: a cheap signal that clips changed behind the data file."""
    stats = []
    for c in index.clips:
        if c.path is not None:
            try:
                st = os.stat(c.path)
                stats.append((c.path, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((c.path, None, None))
    return _hash(stats)


def _tiny_source(spec: str) -> Path:
    """``tiny:N[:K]`` -> the generated file under the cache root (written once, atomically)."""
    parts = spec.split(":")[1:]
    try:
        n, k = int(parts[0]), int(parts[1]) if len(parts) > 1 else 1
    except (ValueError, IndexError):
        raise ValueError(f"data.path {spec!r}: expected tiny:N or tiny:N:K") from None
    target = cache_root() / "tiny_prefs" / f"n{n}_k{k}"
    if not (target / "prefs.jsonl").exists():
        with atomic_dir(target, replace=False) as tmp:  # another process may win the race: its set is identical
            make_tiny_preference_set(tmp, n=n, k=k)
    return target / "prefs.jsonl"


# ---------------------------------------------------------------------------------------------- tensor cache
META = "meta.json"
CACHE_VERSION = 1


class ShardWriter:
    """Appends rows of named tensors; every ``shard_size`` rows become one ``<prefix>-NNNNN.safetensors``.

    Tensors whose dim 1 varies between rows (text encodings) are zero-padded to the shard's longest row.
    """

    def __init__(self, directory: Path, prefix: str, shard_size: int):
        self.directory, self.prefix, self.shard_size = directory, prefix, shard_size
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.shards: list[str] = []
        self.count = 0

    def add(self, **batch: torch.Tensor) -> None:
        n = len(next(iter(batch.values())))
        for i in range(n):
            for name, t in batch.items():
                self.rows.setdefault(name, []).append(t[i].detach().cpu().contiguous())
            self.count += 1
            if len(next(iter(self.rows.values()))) == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.rows or not next(iter(self.rows.values())):
            return
        tensors = {name: _stack_padded(rows) for name, rows in self.rows.items()}
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.directory / name))
        self.shards.append(name)
        self.rows = {}


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    if rows[0].dim() >= 1 and len({r.shape[0] for r in rows}) > 1:
        n = max(r.shape[0] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, 0) * (r.dim() - 1) + (0, n - r.shape[0])) for r in rows]
    return torch.stack(rows)


class ShardReader:
    """Random access to the rows a :class:`ShardWriter` wrote (memory-mapped; picklable for dataloader workers)."""

    def __init__(self, directory: Path, shards: list[str], shard_size: int):
        self.directory, self.shards, self.shard_size = Path(directory), shards, shard_size
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def row(self, i: int, name: str) -> torch.Tensor:
        s, off = divmod(i, self.shard_size)
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.directory / self.shards[s]), framework="pt")
        return self._handles[s].get_slice(name)[off: off + 1][0]


def read_cache_meta(directory: Path) -> dict | None:
    try:
        return json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None


def cache_is_valid(directory: Path, fingerprint: str) -> bool:
    meta = read_cache_meta(directory)
    return bool(meta) and meta.get("version") == CACHE_VERSION and meta.get("fingerprint") == fingerprint


def write_cache_meta(folder: Path, meta: dict) -> None:
    """Written last into a cache being built (inside :func:`mmpref.io.atomic_dir`): it marks the cache complete."""
    (folder / META).write_text(json.dumps({**meta, "version": CACHE_VERSION}, indent=1))


def iter_batches(ids: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(ids), size):
        yield ids[s: s + size]


def default_cache_dir(cfg: AudioPreferenceDataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    source = cfg.path if cfg.path.startswith("tiny:") or not Path(cfg.path).exists() else str(Path(cfg.path).resolve())
    return cache_root() / "diffusion" / _hash([source, cfg.split])[:16]


__all__ = [
    "AudioIssue",
    "AudioPreferenceDataConfig",
    "Clip",
    "InvalidAudioError",
    "PreferenceIndex",
    "ShardReader",
    "ShardWriter",
    "audio_digest",
    "audio_stats_fingerprint",
    "cache_is_valid",
    "check_clip",
    "default_cache_dir",
    "fit_length",
    "format_issues",
    "load_preference_index",
    "write_cache_meta",
    "read_and_check",
    "read_cache_meta",
]
