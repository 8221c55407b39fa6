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
    vals = np.array([r[key] for r in rows], dtype=np.float64).reshape(-1, samples_per_caption)
    # CLAP may score only the first samples of each caption (eval.clap_samples): the others are None -> NaN
    vals = np.nanmean(vals, axis=1) if metric == "clap" else vals.mean(axis=1)
    if metric == "order_accuracy":
        multi = np.array([r["events"] > 1 for r in rows]).reshape(-1, samples_per_caption)[:, 0]
        vals = np.where(multi, vals, np.nan)
    return vals


# the models an evaluation may hold: the base, the control (more SFT), and the arms trained on preferences
MODEL_TITLES = {"base": "base", "sft_more": "SFT-more", "aligned": "aligned", "online": "online"}
ARMS = ("aligned", "online")


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """(arm, other) pairs to difference: each arm against the base, the control, and the arms before it."""
    refs = [n for n in ("base", "sft_more", *ARMS) if n in names]
    return [(arm, ref) for arm in ARMS if arm in names for ref in refs[:refs.index(arm)]]


def summarise_eval(rows: dict[str, list[dict]], samples_per_caption: int, n_boot: int, seed: int) -> dict:
    """Per model: mean and 95% CI of each metric over the captions; ``differences["A-B"]``: the paired difference
    A - B (the models see the same captions and the same initial noise) with its CI, for every arm against the base,
    the SFT-more control and the arms before it (:func:`comparisons`); ``delta`` is ``differences["aligned-base"]``."""
    out: dict[str, Any] = {"models": {}, "differences": {}, "captions": len(rows["base"]) // samples_per_caption,
                           "samples_per_caption": samples_per_caption,
                           "clap_samples_per_caption": sum(r["clap"] is not None
                                                           for r in rows["base"][:samples_per_caption])}
    per = {name: {m: per_caption(r, samples_per_caption, m) for m in METRICS} for name, r in rows.items()}
    for name in rows:
        out["models"][name] = {m: bootstrap_ci(v, n_boot, seed) for m, v in per[name].items()}
    for arm, ref in comparisons(list(rows)):
        out["differences"][f"{arm}-{ref}"] = {m: paired_difference(per[arm][m], per[ref][m], n_boot, seed + 1)
                                              for m in METRICS}
    out["delta"] = out["differences"]["aligned-base"]
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
    """Left: every model per judge metric, each with its 95% bootstrap interval. Right: each arm - base with the
    paired interval, the one the verdict uses (the two models' own intervals overlap even when it excludes 0)."""
    plt = _plt()
    metrics = METRICS[:4]
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(metrics))
    labels = [m.replace("_", " ") for m in metrics]
    names = [n for n in MODEL_TITLES if n in summary["models"]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mean, err = _mean_and_err([summary["models"][name][m] for m in metrics])
        ax.bar(x + (i - (len(names) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=MODEL_TITLES[name])
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    split = "validation" if summary.get("split") == "val" else "held-out"
    ax.set_ylabel(f"judge score on {split} captions")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    arms = [a for a in ARMS if f"{a}-base" in summary.get("differences", {"aligned-base": 0})]
    for i, arm in enumerate(arms):
        diff = summary.get("differences", {}).get(f"{arm}-base", summary["delta"])
        mean, err = _mean_and_err([diff[m] for m in metrics])
        dax.errorbar(x + (i - (len(arms) - 1) / 2) * 0.2, mean, yerr=err, fmt="o", capsize=4,
                     label=MODEL_TITLES[arm])
    dax.axhline(0, color="black", lw=0.8)
    dax.set_xticks(x, labels, fontsize=8)
    dax.set_title("arm - base, paired 95% CI", fontsize=10)
    if len(arms) > 1:
        dax.legend(fontsize=8)
    dax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_online_rounds(rounds: list[dict], path: Path, val: list[dict] | None = None) -> Path:
    """The online arm by round: CLAP reward of the round's own samples and of its winners (left); with ``val``,
    the judge's event recall and order accuracy of each round's policy on the validation captions (right; round
    0 is the base)."""
    plt = _plt()
    panels = [(rounds, (("reward_mean", "all samples"), ("winner_mean", "winners")),
               "round (each on other captions)", "CLAP reward")]
    if val:
        panels.append((val, (("event_recall", "event recall"), ("order_accuracy", "order accuracy")),
                       "policy after round (0 = base)", "judge, validation captions"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.2), squeeze=False)
    for ax, (points, series, xlabel, ylabel) in zip(axes[0], panels):
        x = [r["round"] for r in points]
        for (key, label), marker in zip(series, "os"):
            ax.plot(x, [r[key] for r in points], marker=marker, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(x)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _mean_and_err(cis: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Means and matplotlib's asymmetric error bars from bootstrap intervals."""
    mean = np.array([c["mean"] for c in cis])
    return mean, np.array([mean - [c["lo"] for c in cis], [c["hi"] for c in cis] - mean])


def plot_clap_hist(rows: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    rows = {name: [r for r in v if r["clap"] is not None] for name, v in rows.items()}  # the CLAP-scored samples
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
    return compare_verdict(evaluation["delta"], "aligned", "base")


def compare_verdict(diff: dict, arm: str, ref: str) -> str:
    """Whether ``arm`` beats ``ref`` on order accuracy or event recall outside the 95% CI, and where it is worse."""
    a, r = MODEL_TITLES.get(arm, arm), MODEL_TITLES.get(ref, ref)
    wins = [m for m in ("order_accuracy", "event_recall") if diff[m]["significant"] and diff[m]["mean"] > 0]
    losses = [m for m in METRICS if diff[m]["significant"] and diff[m]["mean"] < 0]
    if wins:
        text = f"{a} beats {r} on {', '.join(wins)} outside the 95% CI"
    else:
        text = f"{a} does NOT beat {r} outside the 95% CI on order accuracy or event recall"
    if losses:
        text += f"; {a} is significantly worse on {', '.join(losses)}"
    return text


def meets_target(evaluation: dict, arm: str) -> bool:
    """The issue's bar for an arm on one seed: better than the base AND the SFT-more control outside the CI on
    event recall or order accuracy, with precision not significantly worse than either."""
    diffs = evaluation.get("differences", {})
    refs = [f"{arm}-base", f"{arm}-sft_more"]
    if not all(k in diffs for k in refs):
        return False
    for k in refs:
        d = diffs[k]
        if not any(d[m]["significant"] and d[m]["mean"] > 0 for m in ("event_recall", "order_accuracy")):
            return False
        if d["event_precision"]["significant"] and d["event_precision"]["mean"] < 0:
            return False
    return True


def target_words(target: dict[str, int], n_seeds: int) -> str:
    """``{"aligned": 0, "online": 2}`` -> "aligned 0 of 3, online 2 of 3"."""
    return ", ".join(f"{MODEL_TITLES[a]} {n} of {n_seeds}" for a, n in target.items())


def _seed_headline(seed_report: dict) -> str:
    """Which arms meet the target on this seed (the offline arm's verdict against base where there is no control)."""
    met = seed_report.get("target_met") or {}
    if "sft_more" not in seed_report["eval"]["models"] or not met:
        return seed_report["verdict"]
    yes = [MODEL_TITLES[a] for a, ok in met.items() if ok]
    no = [MODEL_TITLES[a] for a, ok in met.items() if not ok]
    return (f"{' and '.join(yes)} beat{'s' if len(yes) == 1 else ''} base and SFT-more (the target)" if yes
            else "no arm beats both base and SFT-more (the target)") + (f"; {' and '.join(no)} not" if yes and no
                                                                        else "")


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
    if first.get("online", {}).get("rounds"):
        plots["online_rounds"] = plot_online_rounds(first["online"]["rounds"], out / "plots" / "online_rounds.png",
                                                    first.get("rounds_val", {}).get("rounds"))
    report = {
        "mode": mode,
        "config": cfg_dict,
        "judge": {k: first["judge"][k] for k in ("clean", "griffinlim")},
        "seeds": {str(s): {"eval": r["eval"], "verdict": verdict(r["eval"]),
                           "verdicts": {k: compare_verdict(d, *k.split("-", 1))
                                        for k, d in r["eval"].get("differences", {}).items()},
                           "target_met": {arm: meets_target(r["eval"], arm) for arm in ARMS
                                          if arm in r["eval"]["models"]},
                           "online_rounds": r.get("online", {}).get("rounds"),
                           "rounds_val": r.get("rounds_val", {}).get("rounds"),
                           "stages": {k: {"line": v.get("line", ""), "seconds": v.get("seconds")}
                                      for k, v in r.items()}}
                  for s, r in results.items()},
        "timings_s": timings,
        "plots": {k: str(v.relative_to(out)) for k, v in plots.items()},
    }
    report["claim"] = report["seeds"][str(seeds[0])]["verdict"]
    # the bar: an arm beats base and the control on at least 2 of 3 seeds (here: of the seeds run)
    report["target"] = {arm: sum(report["seeds"][str(s)]["target_met"].get(arm, False) for s in seeds)
                        for arm in ARMS if any(arm in report["seeds"][str(s)]["target_met"] for s in seeds)}
    from mmpref.io import write_json_atomic

    write_json_atomic(out / "report.json", report)
    _write_md(out, report, seeds)
    return report


def _online_words(config: dict) -> str:
    o = config.get("online", {})
    how = ("the synth run on the current policy (perturbed-caption losers from the winner's noise, CLAP-ranked)"
           if o.get("losers_from") == "perturbed" else "the policy's own samples of each caption, ranked by CLAP")
    if o.get("losers_from") == "perturbed" and (o.get("first_round") == "offline" or o.get("captions") == "fresh"):
        first = "the offline preference set in round 0, then " if o.get("first_round") == "offline" else ""
        fresh = " for captions no other set has" if o.get("captions") == "fresh" else ""
        how = f"{first}{how}{fresh}"
    return f"{o.get('rounds', '?')} rounds of DPO on {how}, each round's policy sampling the next"


def _clap_words(ev: dict) -> str:
    k = ev.get("clap_samples_per_caption", ev["samples_per_caption"])
    return "" if k == ev["samples_per_caption"] else f" (CLAP: the first {k} of each caption's samples)"


def _stage_seconds(report: dict, seed: int) -> float:
    return sum(v["seconds"] for v in report["seeds"][str(seed)]["stages"].values() if v.get("seconds") is not None)


def _write_md(out: Path, report: dict, seeds: list[int]) -> None:
    lines = [f"# mmpref demo: diffusion-DPO in a sound-event world ({report['mode']})", ""]
    j = report["judge"]["clean"]
    lines += [f"Judge (frame tagger trained on the world) on clean clips: exact match {j['exact_match']:.3f}, "
              f"event recall {j['event_recall']:.3f}, order accuracy {j['order_accuracy']:.3f}.", ""]
    if report.get("target"):  # first: what a reader wants to know
        lines += ["## Target", "", "Seeds on which an arm beats both the base and the SFT-more control outside the 95% "
                  "CI on event recall or order accuracy, with precision not significantly worse: "
                  + target_words(report["target"], len(seeds)), ""]
    for s in seeds:
        r = report["seeds"][str(s)]
        ev = r["eval"]
        split = "validation" if ev.get("split") == "val" else "held-out"
        names = [n for n in MODEL_TITLES if n in ev["models"]]
        diffs = ev.get("differences", {"aligned-base": ev["delta"]})
        lines += [f"## Seed {s}: {_seed_headline(r)}", "",
                  f"{ev['captions']} {split} captions x {ev['samples_per_caption']} samples"
                  + _clap_words(ev) + "; mean [95% bootstrap CI]. aligned = offline DPO on the synth's preference set"
                  + (f"; online = {_online_words(report['config'])}" if "online" in names else "")
                  + ("; SFT-more = the base trained further on the synth's winners (plain denoising loss, the "
                     "offline alignment's steps)" if "sft_more" in names else "") + ".", "",
                  "| metric | " + " | ".join(MODEL_TITLES[n] for n in names) + " |", "|---" * (1 + len(names)) + "|"]
        for m in METRICS:
            lines.append(f"| {m.replace('_', ' ')} | " + " | ".join(_fmt(ev["models"][n][m]) for n in names) + " |")
        lines += ["", "Paired differences per caption (* = the 95% CI excludes 0):", "",
                  "| metric | " + " | ".join(" - ".join(MODEL_TITLES[x] for x in k.split("-", 1)) for k in diffs)
                  + " |", "|---" * (1 + len(diffs)) + "|"]
        for m in METRICS:
            lines.append(f"| {m.replace('_', ' ')} | " + " | ".join(_dfmt(d[m]) for d in diffs.values()) + " |")
        lines += [""] + [f"- {v}" for k, v in r.get("verdicts", {}).items() if k != "aligned-base"]
        if r.get("online_rounds"):
            lines += ["", "Online rounds (CLAP reward of the policy's own samples; each round draws other captions): "
                      + "; ".join(f"round {x['round']}: mean {x['reward_mean']:.3f}, winners {x['winner_mean']:.3f}"
                                  for x in r["online_rounds"])]
        if r.get("rounds_val"):
            lines += ["", "Each round's policy on the validation captions (judge; round 0 = base): "
                      + "; ".join(f"round {x['round']}: recall {x['event_recall']:.3f}, order "
                                  f"{x['order_accuracy']:.3f}, CLAP {x['clap']:.3f}" for x in r["rounds_val"])]
        lines += ["", "Stages:", ""]
        lines += [f"- {k}: {v['line']} ({v['seconds']:.0f} s)" for k, v in r["stages"].items()
                  if v.get("seconds") is not None]
        lines.append("")
    lines += [f"## Plots (seed {seeds[0]})", "", "![training curves](plots/training_curves.png)", "",
              "![before/after](plots/before_after.png)", "", "![CLAP scores](plots/clap_hist.png)", "",
              *(["![online rounds](plots/online_rounds.png)", ""] if "online_rounds" in report["plots"] else []),
              f"WAV examples: `seed{seeds[0]}/{_folder(report['seeds'][str(seeds[0])]['eval'])}/wav/` "
              "(Griffin-Lim from the generated log-mels).", "",
              "Wall time of this invocation (a cached stage costs ~0 s): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
              + "; the stages' own times, when they ran: "
              + ", ".join(f"seed{s} {_stage_seconds(report, s):.0f} s" for s in seeds), ""]
    from mmpref.io import write_text_atomic

    write_text_atomic(out / "report.md", "\n".join(lines))
