"""data.streaming: a set read row by row (datasets' streaming mode) into a copy under the cache gives the same
index and audio as a normal load; the copy is made once, atomically, and max_groups bounds the rows read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import mmpref.data.stream as stream
from mmpref.data.audio import AudioPreferenceDataConfig, load_preference_index
from mmpref.toy.tones import make_tiny_preference_set

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MMPREF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hub_folder(root: Path, k: int) -> Path:
    """A folder in the hub's layout (data/train-*.parquet) whose audio is embedded as bytes, as on the hub."""
    import datasets

    prefs = make_tiny_preference_set(root / "src", n=6, k=k)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]

    def cell(rel: str) -> dict:
        return {"bytes": (prefs.parent / rel).read_bytes(), "path": Path(rel).name}

    # built as plain structs, then cast: encoding through datasets' Audio feature would need torchcodec
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    table = datasets.Dataset.from_dict(
        {"prompt": [r["prompt"] for r in rows], "chosen": [cell(r["chosen"]) for r in rows],
         "rejected": [[cell(x) for x in r["rejected"]] if k > 1 else cell(r["rejected"]) for r in rows],
         "strategy": [r["strategy"] for r in rows]},
        features=datasets.Features({"prompt": datasets.Value("string"), "chosen": struct,
                                    "rejected": datasets.List(struct) if k > 1 else struct,
                                    "strategy": datasets.Value("string")}))
    audio = datasets.Audio(decode=False)
    table = table.cast_column("chosen", audio).cast_column("rejected", datasets.List(audio) if k > 1 else audio)
    (root / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(root / "hub" / "data" / "train-00000-of-00001.parquet"))
    return root / "hub"


def _same_index(a, b, sample_rate: int = 16000) -> None:
    assert [a.prompts[p] for p, _ in a.groups] == [b.prompts[p] for p, _ in b.groups]
    assert [a.tag(g) for g in a.groups] == [b.tag(g) for g in b.groups]
    for (_, ca), (_, cb) in zip(a.groups, b.groups):
        assert len(ca) == len(cb)
        for x, y in zip(ca, cb):
            np.testing.assert_array_equal(a.read(x, sample_rate), b.read(y, sample_rate))


@pytest.mark.parametrize("k", [1, 3])
def test_streamed_hub_folder_equals_the_normal_load(tmp_path, cache, k):
    folder = _hub_folder(tmp_path, k)
    cfg = AudioPreferenceDataConfig(path=str(folder), duration_s=1.0)
    normal, streamed = load_preference_index(cfg), load_preference_index(replace(cfg, streaming=True))
    _same_index(normal, streamed)
    (copy,) = (cache / "streamed").iterdir()
    assert len(list((copy / "audio").iterdir())) == 6 * (1 + k)  # the bytes, written once as files
    assert streamed.table is not None and all(c.path for c in streamed.clips)  # paths now, not table cells


def test_streamed_jsonl_with_relative_paths(tmp_path):
    prefs = make_tiny_preference_set(tmp_path / "src", n=4, k=1)
    cfg = AudioPreferenceDataConfig(path=str(prefs), duration_s=1.0)
    streamed = load_preference_index(replace(cfg, streaming=True))
    _same_index(load_preference_index(cfg), streamed)
    assert all(Path(c.path).is_relative_to(prefs.parent) for c in streamed.clips)  # still the user's files


def test_copy_is_made_once_and_max_groups_bounds_the_rows(tmp_path, cache, monkeypatch):
    folder = _hub_folder(tmp_path, 1)
    cfg = AudioPreferenceDataConfig(path=str(folder), duration_s=1.0, streaming=True, max_groups=2)
    assert len(load_preference_index(cfg).groups) == 2
    (copy,) = (cache / "streamed").iterdir()
    assert len((copy / "rows.jsonl").read_text().splitlines()) == 2  # the rest of the set was never read

    def no_stream(*a, **k):
        raise AssertionError("streamed again")

    monkeypatch.setattr(stream, "_open_stream", no_stream)
    assert len(load_preference_index(cfg).groups) == 2


def test_interrupted_stream_leaves_nothing_and_restarts(tmp_path, cache, monkeypatch):
    folder = _hub_folder(tmp_path, 1)
    cfg = AudioPreferenceDataConfig(path=str(folder), duration_s=1.0, streaming=True)
    real, calls = stream._audio_cell, []

    def dies_on_the_third(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(stream, "_audio_cell", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        load_preference_index(cfg)
    assert list((cache / "streamed").iterdir()) == []  # no half copy, no temp folder
    monkeypatch.setattr(stream, "_audio_cell", real)
    assert len(load_preference_index(cfg).groups) == 6


def test_train_on_a_streamed_set(tmp_path, capsys):
    from mmpref.cli import main

    folder = _hub_folder(tmp_path, 1)
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tango2_dpo_tiny.yaml"), f"data.path={folder}",
                 "data.streaming=true", "phases=[{name: dpo, loss: {dpo: {beta: 200}}, max_steps: 2}]",
                 f"run.output_dir={run}"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Audio-Alpaca's strategy column survives the stream into the per-strategy metrics
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 2 and all("rewards/accuracies/tiny-tones" in m for m in steps), metrics[-1].keys()
