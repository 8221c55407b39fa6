"""The units of a synthesis run on disk: shards of captions, each finished only when its ``done.json`` checks out.

A shard folder ``shards/shard_NNNNN/`` holds its audio, a ``records.jsonl`` and, written last, a ``done.json`` with
the shard's fingerprint (settings and captions), the records' sha256 and every audio file's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DONE = "done.json"
RECORDS = "records.jsonl"


def settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    end: int
    fingerprint: str

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}"


def plan_shards(captions: list[str], shard_size: int, settings_fp: str) -> list[Shard]:
    return [Shard(i, s, min(s + shard_size, len(captions)), settings_hash([settings_fp, captions[s: s + shard_size]]))
            for i, s in enumerate(range(0, len(captions), shard_size))]


def shard_is_complete(shard_dir: Path, shard: Shard) -> bool:
    """done.json present and matching: fingerprint, records checksum, and every audio file at its size."""
    try:
        done = json.loads((shard_dir / DONE).read_text())
        if done.get("fingerprint") != shard.fingerprint:
            return False
        if file_sha(shard_dir / RECORDS) != done["records_sha256"]:
            return False
        return all((shard_dir / rel).stat().st_size == size for rel, size in done["audio_sizes"].items())
    except (OSError, ValueError, KeyError):
        return False
