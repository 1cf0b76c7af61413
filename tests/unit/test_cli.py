"""The CLI in a terminal and in a script, without services: layout, `-o json`, stdout/stderr,
`--version`, help texts, logs, and the generated reference (docs/cli.md)."""

from __future__ import annotations

import io
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import api.cli_loops
from api.cli import app
from api.cli_reference import OUT, render
from api.client import LoopsError
from infra.cli_output import Column, Listing

CHECKPOINT = {
    "checkpoint_id": "ckf97a1b2c3d4e5f6",
    "run_id": "run0a1b2c3d4",
    "session_id": "sess0a1b2c3d",
    "name": "step-000",
    "kind": "sampler_weights",
    "uri": "bt://loops:run0a1b2c3d4/sampler_weights/step-000",
    "files": [{"relative_file_name": "model.safetensors", "size_bytes": 406321, "sha256": "ab"}],
    "total_size_bytes": 406321,
    "step": 1,
    "status": "active",
    "checkpoint_type": "base",
    "chain_position": None,
    "promoted_to": [],
    "created_at": "2026-11-29T10:08:27.123Z",
}
SESSIONS = [
    {"session_id": "s-0a1b2c3d", "base_model": "loopstream/tiny-llama", "project": None,
     "name": "oops [/] name", "status": "active", "end_reason": None,
     "created_at": "2026-11-29T10:08:24.1Z", "ended_at": None},
    {"session_id": "s-4e5f6a7b", "base_model": "loopstream/tiny-llama", "project": "exp [v2]",
     "name": "x:train:0", "status": "ended", "end_reason": "done",
     "created_at": "2026-11-29T10:07:24.1Z", "ended_at": "2026-11-29T10:08:00.1Z"},
]  # fmt: skip


class FakeClient:
    """Stands in for the SDK: what the API would answer, or a LoopsError for an unknown id."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url

    def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[dict]:
        return SESSIONS[:limit]

    def list_checkpoints(self, run_id: str, *, include_deleted: bool = False) -> list[dict]:
        if run_id != CHECKPOINT["run_id"]:
            raise LoopsError(404, f"run {run_id} not found", "run_id")
        return [CHECKPOINT]

    def iter_checkpoint_files(self, checkpoint_id: str, *, page_size: int = 100) -> Any:
        url = (
            "http://127.0.0.1:19000/loopstream-checkpoints/"
            + "x" * 150
            + "?X-Amz-Signature="
            + "f" * 64
        )
        yield {"relative_file_name": "model.safetensors", "size_bytes": 406321, "url": url}


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.cli_loops, "ServiceClient", FakeClient)


def invoke(*args: str, columns: int = 80) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


# --- layout ---------------------------------------------------------------------------------------


def _printed(listing: Listing, width: int) -> str:
    buffer = io.StringIO()
    listing.print(Console(file=buffer, width=width, emoji=False))
    return buffer.getvalue()


def test_a_table_that_fits_prints_every_value_whole_on_one_line() -> None:
    listing = Listing([Column("checkpoint"), Column("uri"), Column("bytes", justify="right")],
                      [["ckf97a1b2c3d4e5f6", CHECKPOINT["uri"], "406,321"]])  # fmt: skip
    printed = _printed(listing, width=120)
    assert "┃ checkpoint" in printed  # a table
    assert "…" not in printed
    for value in ("ckf97a1b2c3d4e5f6", CHECKPOINT["uri"], "406,321"):
        assert value in printed


def test_a_table_too_wide_for_the_terminal_prints_records_never_an_ellipsis() -> None:
    row = ["ckf97a1b2c3d4e5f6", CHECKPOINT["uri"], "sampler_weights", "active", "406,321"]
    listing = Listing([Column(h) for h in ("checkpoint", "uri", "type", "status", "bytes")], [row])
    printed = _printed(listing, width=80)
    assert "…" not in printed
    assert "┃" not in printed  # records, not a squeezed table
    for header, value in zip(("checkpoint", "uri", "type", "status", "bytes"), row, strict=True):
        assert any(line.split() == [header, value] for line in printed.splitlines()), printed


def test_a_value_longer_than_the_terminal_is_folded_whole_not_cut() -> None:
    url = "http://127.0.0.1:19000/bucket/" + "a" * 200
    printed = _printed(Listing([Column("url")], [[url]]), width=60)
    assert "…" not in printed
    assert url in "".join(line.strip().removeprefix("url").strip() for line in printed.splitlines())


def test_user_text_that_looks_like_markup_prints_as_written() -> None:
    names = ["oops [/] name", "exp [v2]", "x:train:0", "[bold]loud[/bold] :smile:"]
    printed = _printed(Listing([Column("name", kind="text")], [[n] for n in names]), width=80)
    for name in names:
        assert name in printed


# --- -o json, stdout and stderr -------------------------------------------------------------------


def test_sessions_list_json_is_the_api_objects_on_stdout(fake_api: None) -> None:
    done = invoke("sessions", "list", "-o", "json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == SESSIONS
    assert done.stderr == ""


def test_sessions_list_table_shows_every_id_and_name_at_80_columns(fake_api: None) -> None:
    done = invoke("sessions", "list")
    assert done.exit_code == 0, done.output
    assert "…" not in done.stdout
    for s in SESSIONS:
        assert s["session_id"] in done.stdout and s["name"] in done.stdout


def test_checkpoints_list_json_and_table_agree(fake_api: None) -> None:
    as_json = json.loads(
        invoke("checkpoints", "list", CHECKPOINT["run_id"], "--output", "json").stdout
    )
    assert as_json == [CHECKPOINT]
    for columns in (80, 200):
        table = invoke("checkpoints", "list", CHECKPOINT["run_id"], columns=columns).stdout
        assert "…" not in table
        assert CHECKPOINT["checkpoint_id"] in table and CHECKPOINT["uri"] in table
        assert "406,321" in table


def test_checkpoint_file_urls_are_never_cut_even_at_200_columns(fake_api: None) -> None:
    url = next(FakeClient().iter_checkpoint_files("ck"))["url"]
    done = invoke("checkpoints", "files", "ck1", "--urls", columns=200)
    assert "…" not in done.stdout
    joined = "".join(line.strip().removeprefix("url").strip() for line in done.stdout.splitlines())
    assert url in joined
    assert json.loads(invoke("checkpoints", "files", "ck1", "-o", "json").stdout)[0]["url"] == url


def test_an_api_error_goes_to_stderr_and_exits_1_with_nothing_on_stdout(fake_api: None) -> None:
    done = invoke("checkpoints", "list", "nope", "-o", "json")
    assert done.exit_code == 1
    assert done.stdout == ""
    assert "error:" in done.stderr and "run nope not found" in done.stderr


def test_every_listing_and_show_command_takes_output() -> None:
    import typer

    root = typer.main.get_command(app)
    readers = {"list", "show", "status", "files", "syncs", "topics"}
    missing = []

    def walk(path: str, command: Any) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            if name in readers and not any(p.name == "output" for p in sub.params):
                missing.append(f"{path} {name}")
            walk(f"{path} {name}", sub)

    walk("loopstream", root)
    assert missing == []


# --- version, help, logs --------------------------------------------------------------------------


def test_version_prints_the_installed_version_on_stdout() -> None:
    done = invoke("--version")
    assert done.exit_code == 0
    assert done.stdout.strip() == f"loopstream {version('loopstream')}"


def test_services_help_names_every_process() -> None:
    from infra.services import SERVICES

    done = invoke("services", "--help", columns=200)
    assert len(SERVICES) == 8
    for spec in SERVICES:
        assert spec.name in done.stdout


def test_audit_help_lists_only_commands_that_exist() -> None:
    import typer

    audit = typer.main.get_command(app).commands["audit"]
    assert set(audit.commands) == {"history", "tail"}
    assert "state" not in (audit.help or "")


def test_logs_prints_the_last_lines_of_any_service_and_refuses_an_unknown_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import api.cli_logs

    log = tmp_path / "api.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    monkeypatch.setattr(api.cli_logs, "log_files", lambda settings: {"api": log, "kafka": log})
    done = invoke("logs", "api", "-n", "3")
    assert done.exit_code == 0
    assert done.stdout == "line 97\nline 98\nline 99\n"
    refused = invoke("logs", "nope")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "unknown service 'nope'" in refused.stderr


def test_logs_knows_the_stack_and_every_loopstream_service(tmp_path: Path) -> None:
    from api.cli_logs import log_files
    from infra.settings import Settings

    names = set(log_files(Settings(data_dir=tmp_path)))
    assert names == {"kafka", "postgres", "s3", "ray", "command-processor", "projections",
                     "trainer-worker", "sampler-worker", "janitor", "api",
                     "replica-controller", "gateway"}  # fmt: skip


# --- the generated reference ----------------------------------------------------------------------


def test_docs_cli_md_matches_the_cli() -> None:
    assert OUT.read_text() == render(app), "docs/cli.md is stale: run `python -m api.cli_reference`"
