"""Docs that cannot rot: every fenced block marked `runnable` in README.md and docs/ runs
against the test stack, as a reader would run it from the repository root.

A block opens with ```` ```python runnable ```` or ```` ```bash runnable ````. The blocks of one
language in one file run in order as one script (a later block may use what an earlier one
defined), Python with the project's interpreter, shell with `bash -euo pipefail`. The default
workspace's key is in the environment (LOOPSTREAM_API_KEY), as after `make demo`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(python|bash) runnable[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300


def runnable_scripts() -> list[tuple[str, str, str]]:
    """(file, language, script) for every file with runnable blocks."""
    scripts = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        blocks: dict[str, list[str]] = {}
        for language, body in FENCE.findall(path.read_text()):
            blocks.setdefault(language, []).append(body)
        for language, bodies in blocks.items():
            scripts.append((str(path.relative_to(ROOT)), language, "\n".join(bodies)))
    return scripts


SCRIPTS = runnable_scripts()


def test_the_docs_have_runnable_examples() -> None:
    files = {file for file, _, _ in SCRIPTS}
    assert {"README.md", "docs/quickstart-rest.md"} <= files


@pytest.mark.parametrize(
    ("file", "language", "script"), SCRIPTS, ids=[f"{f}:{lang}" for f, lang, _ in SCRIPTS]
)
def test_runnable_example_runs_as_written(
    file: str, language: str, script: str, api_key: str, services: Settings
) -> None:
    env = {**os.environ, "LOOPSTREAM_API_KEY": api_key}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    shell = ["bash", "-euo", "pipefail", "-c", script]
    command = [sys.executable, "-c", script] if language == "python" else shell
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"{file} ({language}) failed with exit {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
