"""The reward-curve plot both RL examples write (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


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
