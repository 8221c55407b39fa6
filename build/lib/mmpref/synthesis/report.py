"""The end-of-run summary: pairs per strategy, score distributions, acceptance per filter, throughput; and the
winner/loser score histogram (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "p50": float(np.median(a)), "max": float(a.max())}


def build_report(cfg, out: Path, groups: list[dict], records: list[dict], grouped: list[dict], pairs: list[dict],
                 filters: list[str], wall_s: float, perturber_rejections: Counter | None) -> dict[str, Any]:
    all_pairs = [(g, p) for g in groups for p in g["pairs"]]
    per_filter = {f: float(np.mean([p["decisions"][f] for _, p in all_pairs])) if all_pairs else 0.0
                  for f in filters}
    by_strategy: dict[str, dict] = {}
    for g, p in all_pairs:
        s = by_strategy.setdefault(g["strategy"], {"considered": 0, "accepted": 0})
        s["considered"] += 1
        s["accepted"] += int(p["accepted"])
    scores = {}
    for name in cfg.scorers:
        accepted = [(g, p) for g, p in all_pairs if p["accepted"]]
        scores[name] = {
            "winner_accepted": _stats([g["winner"]["scores"][name] for g, _ in accepted]),
            "loser_accepted": _stats([p["loser"]["scores"][name] for _, p in accepted]),
            "winner_all": _stats([g["winner"]["scores"][name] for g, _ in all_pairs]),
            "loser_all": _stats([p["loser"]["scores"][name] for _, p in all_pairs]),
        }
    shard_times = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*/done.json"))]
    busy = sum(d["elapsed_s"] for d in shard_times)
    n_captions = len({r["caption_index"] for r in records})
    runs = [json.loads(p.read_text()) for p in sorted((out / "progress").glob("rank*.json"))]
    accepted_total = sum(int(p["accepted"]) for _, p in all_pairs)
    return {
        "captions": n_captions,
        "candidates": len(records),
        "candidates_per_role": dict(Counter(r["role"] for r in records)),
        "operations": dict(Counter(r["operation"] for r in records if r["role"] == "perturbed")),
        "pairs": len(pairs),
        "pairs_per_strategy": dict(Counter(p["strategy"] for p in pairs)),
        "grouped_rows": len(grouped),
        "grouped_rows_per_strategy": dict(Counter(r["strategy"] for r in grouped)),
        "losers_per_prompt": cfg.losers_per_prompt,
        "acceptance": {"pairs_considered": len(all_pairs), "accepted": accepted_total,
                       "rate": accepted_total / len(all_pairs) if all_pairs else 0.0,
                       "pass_rate_per_filter": per_filter, "per_strategy": by_strategy},
        "scores": scores,
        "throughput": {
            "generation_busy_s": busy,  # summed over shards (and processes)
            "captions_per_s": n_captions / busy if busy else 0.0,
            "candidates_per_s": len(records) / busy if busy else 0.0,
            "this_run_wall_s": wall_s,
            "this_run_shards": sorted(i for r in runs for i in r["shards"]),
            "processes": len(runs),
        },
        "perturber_rejections": dict(perturber_rejections or {}),
    }


def write_histogram(groups: list[dict], scorers: list[str], path: Path) -> Path:
    """Winner (one per caption) vs loser score histograms per scorer; the losers of kept pairs are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scorers), figsize=(5 * len(scorers), 3.5), squeeze=False)
    for ax, name in zip(axes[0], scorers):
        winners = list({g["winner"]["id"]: g["winner"]["scores"][name] for g in groups}.values())  # one per caption
        losers = [p["loser"]["scores"][name] for g in groups for p in g["pairs"]]
        kept = [p["loser"]["scores"][name] for g in groups for p in g["pairs"] if p["accepted"]]
        values = winners + losers or [0.0]
        bins = np.linspace(min(values) - 1e-6, max(values) + 1e-6, 21)
        ax.hist(losers, bins=bins, alpha=0.5, label=f"losers ({len(losers)})")
        ax.hist(kept, bins=bins, histtype="step", hatch="//", label=f"kept losers ({len(kept)})")
        ax.hist(winners, bins=bins, alpha=0.5, label=f"winners ({len(winners)})")
        ax.set_title(name)
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".scores.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
