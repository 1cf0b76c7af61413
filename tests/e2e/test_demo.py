"""`make demo`'s RL loop, shortened: every step samples the weights the previous step saved.

Guards the read-your-writes edge the demo lives on: a sampling client pinned to a checkpoint
the moment its save is answered must find that checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT, Settings

sys.path.insert(0, str(REPO_ROOT / "examples"))

import rl_loop


@pytest.mark.timeout(240)
def test_demo_loop_runs_on_the_platform(services: Settings, tmp_path: Path) -> None:
    history = rl_loop.main(rl_loop.Config(steps=4, group_size=8, max_tokens=8, out_dir=tmp_path))

    assert [int(m["step"]) for m in history] == [0, 1, 2, 3]
    assert all(0.0 <= m["reward/mean"] <= 1.0 for m in history)
    assert (tmp_path / "reward_curve.png").stat().st_size > 0
