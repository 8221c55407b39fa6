"""Training curves from ``metrics.jsonl``: loss, reward margins, accuracy and rewards per step, train and eval,
drawn to ``training_curves.png`` beside it when a run ends (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from mmpref.io import atomic_file

# panel title -> the metrics drawn in it (eval/<name> is drawn beside <name> when the run evaluated)
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "reward margin": ("rewards/margins",),
    "reward accuracy": ("rewards/accuracies",),
    "rewards": ("rewards/chosen", "rewards/rejected"),
}


def read_curves(metrics_file: str | Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{panel: {series: (steps, values)}}`` for the :data:`PANELS` metrics the file holds; unreadable lines
    (a kill mid-write) are skipped."""
    rows = []
    for line in Path(metrics_file).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for panel, names in PANELS.items():
        for name in names:
            for series in (name, f"eval/{name}"):
                points = [(r["step"], float(r[series])) for r in rows if series in r and "step" in r]
                if points:
                    steps, values = zip(*points)
                    out.setdefault(panel, {})[series] = (list(steps), list(values))
    return out


def phase_starts(metrics_file: str | Path) -> list[tuple[int, str]]:
    """(first logged step, phase name) for every phase after the first, for the dashed lines between them."""
    starts, last = [], None
    for line in Path(metrics_file).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "phase" in row and row["phase"] != last:
            if last is not None:
                starts.append((row["step"], row["phase"]))
            last = row["phase"]
    return starts


def plot_curves(metrics_file: str | Path, path: str | Path | None = None) -> Path | None:
    """Draw :func:`read_curves` to ``path`` (default ``training_curves.png`` beside the metrics), atomically;
    None when there is nothing to draw."""
    curves = read_curves(metrics_file)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path) if path else Path(metrics_file).with_name("training_curves.png")
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], curves.items()):
        for name, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if name.startswith("eval/") else None, markersize=3, label=name)
        for step, phase in phase_starts(metrics_file):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.text(step, ax.get_ylim()[1], f" {phase}", fontsize=7, va="top", color="grey")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
