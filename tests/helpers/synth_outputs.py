"""What a synthesis run produced, for comparing two runs (one process vs two, killed vs uninterrupted)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(out: Path) -> dict:
    """Everything a run produces, minus timings: dataset rows, jsonl files, every audio/records file's hash."""
    import datasets

    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((out / "shards").rglob("*")) if p.is_file() and p.name != "done.json"}
    return {"dataset": datasets.load_from_disk(str(out / "dataset")).to_list(),
            **{name: (out / name).read_text() for name in ("grouped.jsonl", "pairs.jsonl", "candidates.jsonl")},
            "files": files}
