"""The merge: finished shards -> winner/loser groups -> filters -> dataset, grouped.jsonl, pairs.jsonl, report.

Per caption the winner is the original-caption sample with the highest score on the first scorer (ties: the
lowest sample index). Strategy ``resample`` ranks the other samples of the original caption as losers; ``concept``
and ``temporal`` use the audio of the perturbed captions as losers of the *original* caption. A pair is kept when
it passes every filter (:mod:`mmpref.synthesis.filters`). Kept losers are ordered by the first scorer's margin,
largest first; ``grouped.jsonl`` holds the first K of each group with at least K.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mmpref.synthesis.config import SynthConfig
from mmpref.synthesis.filters import FilterThresholds, filter_decisions, filter_names
from mmpref.synthesis.report import build_report, write_histogram


def read_shard_records(out: Path, shards: list) -> list[dict]:
    from mmpref.synthesis.run import RECORDS, shard_is_complete

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
    """``datasets.save_to_disk`` into a temp folder, then swap it in place of the old one."""
    import datasets

    table = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"prompt": [], "chosen": [], "rejected": [], "strategy": []})
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    table.save_to_disk(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def merge(cfg: SynthConfig, out: Path, shards: list, settings: dict, scorer_ids: dict, perturber: Any,
          wall_s: float) -> dict:
    """Write every output of the run from the shards' records (main process only); returns the report."""
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
    _save_dataset(dataset_rows, out / "dataset")
    write_jsonl_atomic(out / "grouped.jsonl", grouped, sort_keys=True)
    write_jsonl_atomic(out / "pairs.jsonl", pairs, sort_keys=True)
    write_jsonl_atomic(out / "candidates.jsonl", records, sort_keys=True)
    thresholds = {n: vars(FilterThresholds.of(s)) for n, s in cfg.scorers.items()}
    write_text_atomic(out / "settings.json", json.dumps(
        {**settings, "scorers": scorer_ids, "filters": thresholds, "losers_per_prompt": k,
         "config": _plain(cfg)}, indent=1, default=str))
    report = build_report(cfg, out, groups, records, grouped, pairs, filter_names(list(cfg.scorers)), wall_s,
                          getattr(perturber, "rejections", None))
    write_histogram(groups, list(cfg.scorers), out / "scores.png")
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    return report


def _plain(cfg: SynthConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
