"""Training curves from run logs: loss (raw and smoothed), learning rate, dev metric per evaluation.

``plot_runs([run])`` draws one run (``mnr train`` writes OUTPUT/curves.png at its end); several
runs are overlaid, one colour each, to compare recipes (``mnr plot RUN...``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnr import rundir
from mnr.errors import DataError
from mnr.rundir import RunDir


def smooth(values: list[float], window: int) -> np.ndarray:
    """Moving average over ``window`` steps (the first window - 1 points are averaged over fewer)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def plot_runs(runs: list[Path], output: Path, labels: list[str] | None = None) -> Path:
    """Draw the curves of ``runs`` (run directories) into the PNG ``output``; return its path."""
    import matplotlib.pyplot as plt

    fig = draw(runs, labels)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(output)  # never a half-written picture
    return output


def draw(runs: list[Path], labels: list[str] | None = None):
    """The figure: three panels (loss, learning rate, dev metric), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = []
    for run in runs:
        entries = RunDir(run).read_log()
        if not entries:
            raise DataError(f"{run}: no log.jsonl with training steps (is it an mnr run directory?)")
        logs.append(entries)
    labels = labels or [_label(run, runs) for run in runs]
    fig, (loss_ax, lr_ax, dev_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dev_drawn = False
    for i, (entries, label) in enumerate(zip(logs, labels, strict=True)):
        color = colors[i % len(colors)]
        steps = [e["step"] for e in entries if "loss" in e]
        # one loss curve per dataset (a run of several: each step's dataset is logged), dashed after the first
        datasets = list(dict.fromkeys(e.get("dataset") for e in entries if "loss" in e))
        for j, dataset in enumerate(datasets):
            points = [(e["step"], e["loss"]) for e in entries if "loss" in e and e.get("dataset") == dataset]
            own_steps, losses = [p[0] for p in points], [p[1] for p in points]
            window = max(1, min(50, len(losses) // 10))
            name = f"{label}: {dataset}" if dataset else label
            loss_ax.plot(own_steps, losses, color=color, alpha=0.2, linewidth=0.8)
            loss_ax.plot(own_steps, smooth(losses, window), "-" if j == 0 else "--", color=color,
                         label=f"{name} (mean of {window} steps)" if window > 1 else name)
        if steps:
            lr_ax.plot(steps, [e["lr"] for e in entries if "loss" in e], color=color, label=label)
        evaluations = rundir.evaluations(entries)
        for j, name in enumerate(dict.fromkeys(k for e in evaluations for k, v in e.items() if isinstance(v, dict))):
            metric = next(iter(next(e[name] for e in evaluations if name in e)))  # the first: the headline one
            points = [(e["step"], e[name][metric]) for e in evaluations if name in e]
            dev_ax.plot(*zip(*points, strict=True), "o-" if j == 0 else "s--", color=color,
                        label=f"{label}: {name} {metric}")
            dev_drawn = True
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    dev_ax.set(title="dev metric per evaluation (step 0: the base model)", xlabel="step")
    if not dev_drawn:
        dev_ax.text(0.5, 0.5, "no dev set in this run\n(--sts-dev)", ha="center", va="center",
                    transform=dev_ax.transAxes)
    for ax in (loss_ax, lr_ax, dev_ax):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _label(run: Path, runs: list[Path]) -> str:
    """The shortest distinctive name: the directory's name, or its path when names repeat."""
    names = [Path(r).name for r in runs]
    return Path(run).name if names.count(Path(run).name) == 1 else str(run)
