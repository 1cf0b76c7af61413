"""What both RL examples show at the end: the reward-curve plot (matplotlib, headless) and a
summary table of the first and last steps."""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_reward_curve(history: list[dict[str, float]], path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in history], [m["reward/mean"] for m in history], marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (fraction of 'a')")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(
    console: Console,
    history: list[dict[str, float]],
    *,
    title: str,
    metric: tuple[str, str, str],
    plot: Path,
) -> None:
    """The first and last three steps, with one example-specific column, e.g.
    `metric=("logprob gap", "logprob_gap/mean", ".2e")` (header, history key, format)."""
    header, key, spec = metric
    summary = Table("step", "reward/mean", header, "time/step (s)", title=title)
    for m in history[:3] + history[-3:]:
        summary.add_row(
            str(int(m["step"])),
            f"{m['reward/mean']:.3f}",
            format(m[key], spec),
            f"{m['time/step']:.2f}",
        )
    console.print(summary)
    console.print(
        f"mean reward {history[0]['reward/mean']:.3f} -> {history[-1]['reward/mean']:.3f} "
        f"in {len(history)} steps, {statistics.median(m['time/step'] for m in history):.2f} s "
        f"per step (median); curve: {plot}"
    )
