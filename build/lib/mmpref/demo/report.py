"""The demo's numbers and report: bootstrap confidence intervals, report.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmpref.demo.stages import eval_folder
from mmpref.stats import bootstrap_ci, paired_difference

# event_precision guards event_recall: a model that makes every sound at once would max recall, not precision
METRICS = ("event_recall", "event_precision", "order_accuracy", "exact_match", "clap")


def per_caption(rows: list[dict], samples_per_caption: int, metric: str) -> np.ndarray:
    """One value per held-out caption: the metric averaged over its samples.

    ``order_accuracy`` only counts captions naming 2+ events (a single event has no order): NaN for the others.
    """
    key = "order_correct" if metric == "order_accuracy" else metric
    vals = np.array([r[key] for r in rows], dtype=np.float64).reshape(-1, samples_per_caption).mean(axis=1)
    if metric == "order_accuracy":
        multi = np.array([r["events"] > 1 for r in rows]).reshape(-1, samples_per_caption)[:, 0]
        vals = np.where(multi, vals, np.nan)
    return vals


def summarise_eval(rows: dict[str, list[dict]], samples_per_caption: int, n_boot: int, seed: int) -> dict:
    """Per model: mean and 95% CI of each metric over held-out captions; ``delta``: the paired difference
    aligned - base (both models see the same captions and the same initial noise), with its CI."""
    out: dict[str, Any] = {"models": {}, "delta": {}, "captions": len(rows["base"]) // samples_per_caption,
                           "samples_per_caption": samples_per_caption}
    per = {name: {m: per_caption(r, samples_per_caption, m) for m in METRICS} for name, r in rows.items()}
    for name in rows:
        out["models"][name] = {m: bootstrap_ci(v, n_boot, seed) for m, v in per[name].items()}
    for m in METRICS:
        out["delta"][m] = paired_difference(per["aligned"][m], per["base"][m], n_boot, seed + 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_file: Path, path: Path) -> Path:
    """Loss, implicit reward accuracy and reward margin of the alignment run, per logged step."""
    plt = _plt()
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    keys = (("loss", "loss"), ("rewards/accuracies", "implicit accuracy"), ("rewards/margins", "reward margin"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_before_after(summary: dict, path: Path) -> Path:
    """Left: base vs aligned per judge metric, each with its 95% bootstrap interval. Right: aligned - base with the
    paired interval, the one the verdict uses (the two models' own intervals overlap even when it excludes 0)."""
    plt = _plt()
    metrics = METRICS[:4]
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(metrics))
    labels = [m.replace("_", " ") for m in metrics]
    for i, name in enumerate(("base", "aligned")):
        mean, err = _mean_and_err([summary["models"][name][m] for m in metrics])
        ax.bar(x + (i - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=4, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    split = "validation" if summary.get("split") == "val" else "held-out"
    ax.set_ylabel(f"judge score on {split} captions")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    mean, err = _mean_and_err([summary["delta"][m] for m in metrics])
    dax.errorbar(x, mean, yerr=err, fmt="o", color="tab:orange", capsize=4)
    dax.axhline(0, color="black", lw=0.8)
    dax.set_xticks(x, labels, fontsize=8)
    dax.set_title("aligned - base, paired 95% CI", fontsize=10)
    dax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _mean_and_err(cis: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Means and matplotlib's asymmetric error bars from bootstrap intervals."""
    mean = np.array([c["mean"] for c in cis])
    return mean, np.array([mean - [c["lo"] for c in cis], [c["hi"] for c in cis] - mean])


def plot_clap_hist(rows: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    all_scores = np.concatenate([[r["clap"] for r in v] for v in rows.values()])
    bins = np.linspace(all_scores.min(), all_scores.max() + 1e-9, 20)
    for name, v in rows.items():
        ax.hist([r["clap"] for r in v], bins=bins, alpha=0.55, label=name)
    ax.set_xlabel("CLAP score (caption vs generated audio)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    from mmpref.io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# report.md / report.json
# ----------------------------------------------------------------------------------------------------------------


def _fmt(ci: dict) -> str:
    return f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _dfmt(ci: dict) -> str:
    return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" + (" *" if ci.get("significant") else "")


def verdict(evaluation: dict) -> str:
    """The demo's claim, checked: aligned beats base on order accuracy or event recall outside the 95% CI."""
    wins = [m for m in ("order_accuracy", "event_recall")
            if evaluation["delta"][m]["significant"] and evaluation["delta"][m]["mean"] > 0]
    losses = [m for m in METRICS if evaluation["delta"][m]["significant"] and evaluation["delta"][m]["mean"] < 0]
    if wins:
        text = f"aligned beats base on {', '.join(wins)} outside the 95% CI"
    else:
        text = "aligned does NOT beat base outside the 95% CI on order accuracy or event recall"
    if losses:
        text += f"; aligned is significantly worse on {', '.join(losses)}"
    return text


def _folder(evaluation: dict) -> str:
    return eval_folder(evaluation.get("split", "heldout"))


def write_report(out: Path, results: dict[int, dict], cfg_dict: dict, timings: dict, mode: str) -> dict:
    """``report.json`` (every number) and ``report.md`` (tables + plots of the first seed) under ``out``."""
    seeds = sorted(results)
    first = results[seeds[0]]
    run = out / f"seed{seeds[0]}"
    plots = {
        "curves": plot_training_curves(run / "dpo" / "metrics.jsonl", out / "plots" / "training_curves.png"),
        "bars": plot_before_after(first["eval"], out / "plots" / "before_after.png"),
        "clap": plot_clap_hist(json.loads((run / _folder(first["eval"]) / "samples.json").read_text()),
                               out / "plots" / "clap_hist.png"),
    }
    report = {
        "mode": mode,
        "config": cfg_dict,
        "judge": {k: first["judge"][k] for k in ("clean", "griffinlim")},
        "seeds": {str(s): {"eval": r["eval"], "verdict": verdict(r["eval"]),
                           "stages": {k: {"line": v.get("line", ""), "seconds": v.get("seconds")}
                                      for k, v in r.items()}}
                  for s, r in results.items()},
        "timings_s": timings,
        "plots": {k: str(v.relative_to(out)) for k, v in plots.items()},
    }
    report["claim"] = report["seeds"][str(seeds[0])]["verdict"]
    from mmpref.io import write_json_atomic

    write_json_atomic(out / "report.json", report)
    _write_md(out, report, seeds)
    return report


def _stage_seconds(report: dict, seed: int) -> float:
    return sum(v["seconds"] for v in report["seeds"][str(seed)]["stages"].values() if v.get("seconds") is not None)


def _write_md(out: Path, report: dict, seeds: list[int]) -> None:
    lines = [f"# mmpref demo: diffusion-DPO in a sound-event world ({report['mode']})", ""]
    j = report["judge"]["clean"]
    lines += [f"Judge (frame tagger trained on the world) on clean clips: exact match {j['exact_match']:.3f}, "
              f"event recall {j['event_recall']:.3f}, order accuracy {j['order_accuracy']:.3f}.", ""]
    for s in seeds:
        r = report["seeds"][str(s)]
        ev = r["eval"]
        split = "validation" if ev.get("split") == "val" else "held-out"
        lines += [f"## Seed {s}: {r['verdict']}", "",
                  f"{ev['captions']} {split} captions x {ev['samples_per_caption']} samples; mean [95% bootstrap "
                  "CI]; delta = aligned - base, paired per caption (* = CI excludes 0).", "",
                  "| metric | base | aligned | delta |", "|---|---|---|---|"]
        for m in METRICS:
            lines.append(f"| {m.replace('_', ' ')} | {_fmt(ev['models']['base'][m])} | "
                         f"{_fmt(ev['models']['aligned'][m])} | {_dfmt(ev['delta'][m])} |")
        lines += ["", "Stages:", ""]
        lines += [f"- {k}: {v['line']} ({v['seconds']:.0f} s)" for k, v in r["stages"].items()
                  if v.get("seconds") is not None]
        lines.append("")
    lines += [f"## Plots (seed {seeds[0]})", "", "![training curves](plots/training_curves.png)", "",
              "![before/after](plots/before_after.png)", "", "![CLAP scores](plots/clap_hist.png)", "",
              f"WAV examples: `seed{seeds[0]}/{_folder(report['seeds'][str(seeds[0])]['eval'])}/wav/` "
              "(Griffin-Lim from the generated log-mels).", "",
              "Wall time of this invocation (a cached stage costs ~0 s): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
              + "; the stages' own times, when they ran: "
              + ", ".join(f"seed{s} {_stage_seconds(report, s):.0f} s" for s in seeds), ""]
    from mmpref.io import write_text_atomic

    write_text_atomic(out / "report.md", "\n".join(lines))
