"""What both RL examples show at the end: the reward-curve plot (matplotlib, headless) with the
spread across rollouts, and a summary table of the first and last steps."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table


def reward_metrics(rewards: list[float]) -> dict[str, float]:
    """A step's rewards across its rollouts: mean and interquartile range."""
    q1, _, q3 = statistics.quantiles(rewards, n=4, method="inclusive")
    return {"reward/mean": statistics.fmean(rewards), "reward/p25": q1, "reward/p75": q3}


def write_reward_curve(
    history: list[dict[str, float]], path: Path, *, title: str, settings: str
) -> Path:
    """The mean reward per step, with a band from the 25th to the 75th percentile of the step's
    rollouts; `settings` (the run's configuration, one line) goes under the title."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(
        steps,
        [m["reward/p25"] for m in history],
        [m["reward/p75"] for m in history],
        alpha=0.25,
        label="rollouts: 25th-75th percentile",
    )
    ax.plot(steps, [m["reward/mean"] for m in history], marker="o", ms=3, label="mean")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward (fraction of 'a')")
    ax.set_ylim(0, 1)
    fig.suptitle(title)
    ax.set_title(textwrap.fill(settings, 100), fontsize=7, color="0.35")
    ax.legend(loc="upper left", fontsize=8)
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
    summary = Table("step", "reward/mean", "p25-p75", header, "time/step (s)", title=title)
    shown = history if len(history) <= 6 else [*history[:3], None, *history[-3:]]
    for m in shown:
        if m is None:  # the steps in between, left out
            summary.add_row(f"({len(history) - 6} more)", "...", "...", "...", "...")
            continue
        summary.add_row(
            str(int(m["step"])),
            f"{m['reward/mean']:.3f}",
            f"{m['reward/p25']:.2f}-{m['reward/p75']:.2f}",
            format(m[key], spec),
            f"{m['time/step']:.2f}",
        )
    console.print(summary)
    console.print(
        f"mean reward {history[0]['reward/mean']:.3f} -> {history[-1]['reward/mean']:.3f} "
        f"in {len(history)} steps, {statistics.median(m['time/step'] for m in history):.2f} s "
        f"per step (median); curve: {plot}"
    )
