"""The CLI prints user text as written: names that look like Rich markup or emoji codes.

A session named `x:train:0` (Tinker's model ids look like that) must not show an emoji,
`exp [v2]` must keep its bracket, and `oops [/] name` (a closing tag with nothing open) must not
raise MarkupError, which would break `sessions list` for every user of the workspace.
"""

from __future__ import annotations

import uuid

import pytest
from typer.testing import CliRunner

from api.cli import app
from infra.settings import Settings

NAMES = ("x:train:0", "exp [v2]", "oops [/] name", "[bold]loud[/bold] :smile:")


def _cli(*args: str) -> str:
    # Wide enough that no name wraps: what is checked is the text, not the layout.
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    assert done.exit_code == 0, f"{args}: {done.output}\n{done.exception!r}"
    return done.output


def _assert_verbatim(printed: str) -> None:
    for name in NAMES:
        assert name in printed, f"{name!r} not printed as written:\n{printed}"
    assert "\N{TRAM CAR}" not in printed and "\N{SMILING FACE WITH OPEN MOUTH}" not in printed


@pytest.fixture(scope="module")
def named_sessions(services: Settings) -> list[str]:
    from api.client import ServiceClient

    with ServiceClient() as service:
        made = [service.create_session("loopstream/tiny-llama", name=n).session_id for n in NAMES]
    yield made
    with ServiceClient() as service:
        for session_id in made:
            service.end_session(session_id, reason="test over").result(60)


def test_session_names_print_as_written_in_lists_shows_and_audit(
    named_sessions: list[str],
) -> None:
    _assert_verbatim(_cli("sessions", "list", "--limit", "50"))
    for session_id, name in zip(named_sessions, NAMES, strict=True):
        _cli("sessions", "show", session_id)  # prints no name today, but must not crash
        assert name in _cli("audit", "history", session_id)


def test_key_and_workspace_names_print_as_written(services: Settings) -> None:
    workspace = f"w{uuid.uuid4().hex[:8]}"
    _cli("workspaces", "create", workspace, "--name", "exp [v2]")
    for name in NAMES:
        _cli("keys", "create", "--workspace", workspace, "--scope", "infer", "--name", name)
    _assert_verbatim(_cli("keys", "list", "--workspace", workspace))
    assert "exp [v2]" in _cli("workspaces", "list")
