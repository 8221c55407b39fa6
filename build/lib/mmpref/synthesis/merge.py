"""The merge: finished shards -> winner/loser groups -> filters -> dataset, grouped.jsonl, pairs.jsonl, report.

Per caption the winner is the original-caption sample with the highest score on the first scorer (ties: the
lowest sample index). Strategy ``resample`` ranks the other samples of the original caption as losers; ``concept``
and ``temporal`` use the audio of the perturbed captions as losers of the *original* caption. A pair is kept when
it passes every filter (:mod:`mmpref.synthesis.filters`). Kept losers are ordered by the first scorer's margin,
largest first; ``grouped.jsonl`` holds the first K of each group with at least K.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmpref.data.audio import DATASET_HINT
from mmpref.errors import DataError
from mmpref.synthesis.config import SynthConfig
from mmpref.synthesis.filters import FilterThresholds, filter_decisions, filter_names
from mmpref.synthesis.report import build_report, write_histogram
from mmpref.synthesis.shards import RECORDS, shard_is_complete


def read_shard_records(out: Path, shards: list) -> list[dict]:
    records = []
    for shard in shards:
        shard_dir = out / "shards" / shard.name
        if not shard_is_complete(shard_dir, shard):
            raise RuntimeError(f"{shard_dir} is not complete (a process failed?); run the same command again to "
                               "redo it")
        records += [json.loads(line) for line in (shard_dir / RECORDS).read_text().splitlines()]
    return records


def build_groups(records: list[dict], cfg: SynthConfig) -> list[dict]:
    """One group per (caption, strategy) with every candidate pair and its filter decisions."""
    names = list(cfg.scorers)
    primary = names[0]
    thresholds = {n: FilterThresholds.of(s) for n, s in cfg.scorers.items()}
    by_caption: dict[int, list[dict]] = {}
    for r in records:
        by_caption.setdefault(r["caption_index"], []).append(r)
    groups = []
    for index in sorted(by_caption):
        cands = by_caption[index]
        originals = [c for c in cands if c["role"] == "original"]
        winner = max(originals, key=lambda c: (c["scores"][primary], -originals.index(c)))
        for strategy in cfg.strategies:
            if strategy == "resample":
                losers = [c for c in originals if c is not winner]
            else:
                losers = [c for c in cands if c["role"] == "perturbed" and c["strategy"] == strategy]
            if not losers:
                continue
            pairs = []
            for lo in losers:
                decisions = filter_decisions(winner["scores"], lo["scores"], thresholds)
                margin = winner["scores"][primary] - lo["scores"][primary]
                pairs.append({"loser": lo, "decisions": decisions, "accepted": all(decisions.values()),
                              "margin": margin})
            pairs.sort(key=lambda p: (-p["margin"], p["loser"]["id"]))
            groups.append({"caption_index": index, "prompt": winner["prompt"], "strategy": strategy,
                           "winner": winner, "pairs": pairs})
    return groups


def _dataset_row(group: dict, cfg: SynthConfig) -> dict:
    kept = [p for p in group["pairs"] if p["accepted"]]
    w, g = group["winner"], cfg.generation
    return {
        "prompt": group["prompt"],
        "chosen": w["audio"],
        "rejected": [p["loser"]["audio"] for p in kept],
        "strategy": group["strategy"],
        "rejected_captions": [p["loser"]["text"] for p in kept],
        "rejected_operations": [p["loser"]["operation"] for p in kept],
        "chosen_scores": w["scores"],
        "rejected_scores": [p["loser"]["scores"] for p in kept],
        "chosen_steps": w["steps"],
        "rejected_steps": [p["loser"]["steps"] for p in kept],
        "chosen_seed": w["seed"],
        "rejected_seeds": [p["loser"]["seed"] for p in kept],
        "guidance_scale": g.guidance_scale,
        "duration_s": g.duration_s,
        "sample_rate": w["sample_rate"],
        "caption_index": group["caption_index"],
    }


def _pair_rows(group: dict) -> list[dict]:
    w = group["winner"]
    return [{"prompt": group["prompt"], "chosen": w["audio"], "rejected": p["loser"]["audio"],
             "strategy": group["strategy"], "rejected_caption": p["loser"]["text"],
             "operation": p["loser"]["operation"], "chosen_scores": w["scores"],
             "rejected_scores": p["loser"]["scores"]}
            for p in group["pairs"] if p["accepted"]]


def _save_dataset(rows: list[dict], path: Path) -> None:
    """``datasets.save_to_disk`` into ``path`` (inside the staging folder), with a note that its audio paths are
    relative to the run folder above it, so ``mmpref train data.path=<run>/dataset`` finds the clips."""
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    (path / DATASET_HINT).write_text(json.dumps({"audio_root": ".."}))


# The merge's outputs, published together: written into STAGING, then moved into place. A kill while moving is
# completed by the next run (finish_publish), so a reader never finds half of one merge beside half of another.
OUTPUTS = ("dataset", "grouped.jsonl", "pairs.jsonl", "candidates.jsonl", "settings.json", "scores.png",
           "report.json")  # report.json last: its presence says the set is complete
STAGING = ".merge.tmp"
READY = "READY"


def finish_publish(out: Path) -> None:
    """Complete a publish that a kill interrupted (its staging holds READY), or drop an unfinished staging."""
    stage = out / STAGING
    if not stage.exists():
        return
    if not (stage / READY).exists():
        shutil.rmtree(stage)  # the merge itself was interrupted: the published set is still the previous one
        return
    for name in OUTPUTS:
        src, dst = stage / name, out / name
        if not src.exists():
            continue  # moved before the interruption
        if src.is_dir():
            old = stage / f"old-{name}"
            if old.exists():
                shutil.rmtree(old)
            if dst.exists():
                os.replace(dst, old)
        os.replace(src, dst)
    shutil.rmtree(stage)


def merge(cfg: SynthConfig, out: Path, shards: list, settings: dict, scorer_ids: dict, perturber: Any,
          wall_s: float) -> dict:
    """Write every output of the run from the shards' records (main process only); returns the report.

    Refuses, writing nothing, when no pair survives the filters."""
    from mmpref.io import write_jsonl_atomic, write_text_atomic

    records = read_shard_records(out, shards)
    groups = build_groups(records, cfg)
    dataset_rows = [_dataset_row(g, cfg) for g in groups if any(p["accepted"] for p in g["pairs"])]
    k = cfg.losers_per_prompt
    grouped = [{**{key: r[key] for key in ("prompt", "chosen", "strategy", "chosen_scores")},
                "rejected": r["rejected"][:k], "rejected_captions": r["rejected_captions"][:k],
                "rejected_scores": r["rejected_scores"][:k]}
               for r in dataset_rows if len(r["rejected"]) >= k]
    pairs = [row for g in groups for row in _pair_rows(g)]
    thresholds = {n: vars(FilterThresholds.of(s)) for n, s in cfg.scorers.items()}
    if not pairs:
        raise DataError(f"0 pairs survived the filters ({len(records)} candidates; thresholds {thresholds}); "
                        "nothing was written. Loosen the thresholds in the config (scorers.NAME.alpha / beta / "
                        "delta_min / delta_max) and run again: the audio is reused")
    stage = out / STAGING
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    _save_dataset(dataset_rows, stage / "dataset")
    write_jsonl_atomic(stage / "grouped.jsonl", grouped, sort_keys=True)
    write_jsonl_atomic(stage / "pairs.jsonl", pairs, sort_keys=True)
    write_jsonl_atomic(stage / "candidates.jsonl", records, sort_keys=True)
    write_text_atomic(stage / "settings.json", json.dumps(
        {**settings, "scorers": scorer_ids, "filters": thresholds, "losers_per_prompt": k,
         "config": _plain(cfg)}, indent=1, default=str))
    report = build_report(cfg, out, groups, records, grouped, pairs, filter_names(list(cfg.scorers)), wall_s,
                          getattr(perturber, "rejections", None))
    write_histogram(groups, list(cfg.scorers), stage / "scores.png")
    write_text_atomic(stage / "report.json", json.dumps(report, indent=1))
    (stage / READY).write_text("")
    finish_publish(out)
    return report


def _plain(cfg: SynthConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
