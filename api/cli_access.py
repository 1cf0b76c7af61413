"""`loopstream keys ...` and `loopstream workspaces ...`: operator tools for access.

Like the other operator commands they speak to Kafka and PostgreSQL directly (no API key
needed: whoever can reach those can do anything anyway). A created key is printed once.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from api.bootstrap import issue_key, send_and_wait
from api.queries import ReadModels
from commands.access import RevokeApiKey, aggregate_id_of
from commands.envelope import DEFAULT_WORKSPACE, CommandEnvelope
from events.ids import new_event_id
from infra.settings import get_settings
from projections.db import get_engine

console = Console()
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, revoke.")
workspaces_app = typer.Typer(no_args_is_help=True, help="Workspaces (tenants): create, list.")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


@keys_app.command("create")
def keys_create(
    workspace: str = typer.Option(DEFAULT_WORKSPACE, help="the key's workspace"),
    scope: list[str] = typer.Option(["admin"], "--scope", help="admin, train or infer (repeat)"),
    name: str | None = typer.Option(None, help="a label"),
) -> None:
    """Issue a key and print it (once: only its hash is kept)."""
    try:
        key = issue_key(get_settings(), workspace_id=workspace, scopes=tuple(scope), name=name)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    workspace: str = typer.Option(DEFAULT_WORKSPACE, help="whose keys"),
) -> None:
    settings = get_settings()
    with get_engine(settings).connect() as conn:
        rows = ReadModels(conn, settings.read_schema).api_keys(workspace)
    table = Table("key_id", "name", "scopes", "prefix", "created", "revoked")
    for row in rows:
        table.add_row(
            row["key_id"], row["name"] or "", ",".join(row["scopes"]), row["prefix"],
            str(row["created_at"]), str(row["revoked_at"] or ""),
        )  # fmt: skip
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="the key id (the part after tml-)"),
    reason: str | None = typer.Option(None, help="why, for the audit trail"),
) -> None:
    settings = get_settings()
    with get_engine(settings).connect() as conn:
        row = ReadModels(conn, settings.read_schema).api_key(key_id)
    if row is None:
        _fail(f"api key {key_id} not found")
        return
    envelope = CommandEnvelope(
        command_id=f"revoke-key:{new_event_id()}",
        type="RevokeApiKey",
        aggregate_id=aggregate_id_of(row["workspace_id"]),
        actor="operator",
        workspace_id=row["workspace_id"],
        payload=RevokeApiKey(key_id=key_id, reason=reason).model_dump(mode="json"),
    )
    try:
        send_and_wait(settings, envelope)
    except (RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    console.print(f"revoked {key_id}")


@workspaces_app.command("create")
def workspaces_create(
    workspace_id: str = typer.Argument(..., help="lowercase letters, digits and dashes"),
    name: str | None = typer.Option(None, help="a display name"),
) -> None:
    envelope = CommandEnvelope(
        command_id=f"create-workspace:{new_event_id()}",
        type="CreateWorkspace",
        aggregate_id=aggregate_id_of(workspace_id),
        actor="operator",
        payload={"name": name},
    )
    try:
        send_and_wait(get_settings(), envelope)
    except (RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    console.print(f"created workspace {workspace_id}")


@workspaces_app.command("list")
def workspaces_list() -> None:
    settings = get_settings()
    with get_engine(settings).connect() as conn:
        rows = ReadModels(conn, settings.read_schema).workspaces()
    table = Table("workspace_id", "name", "created")
    table.add_row(DEFAULT_WORKSPACE, "(always exists)", "")
    for row in rows:
        table.add_row(row["workspace_id"], row["name"] or "", str(row["created_at"]))
    console.print(table)
