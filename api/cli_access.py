"""`loopstream keys ...` and `loopstream workspaces ...`: operator tools for access.

Like the other operator commands they speak to Kafka and PostgreSQL directly (no API key
needed: whoever can reach those can do anything anyway). A created key is printed once.
The heavy modules (the API's auth, SQLAlchemy, Kafka) are imported inside the commands, so
`loopstream --help` and `--version` stay fast.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.text import Text

from events.envelope import DEFAULT_WORKSPACE
from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit, fail, stdout_console, when
from infra.settings import get_settings

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, revoke.")
workspaces_app = typer.Typer(no_args_is_help=True, help="Workspaces (tenants): create, list.")


def _send(envelope: Any) -> None:
    from api.bootstrap import send_and_wait

    try:
        send_and_wait(get_settings(), envelope)
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc))


def _rows(query: str, *args: Any) -> Any:
    from api.queries import ReadModels
    from projections.db import get_engine

    settings = get_settings()
    with get_engine(settings).connect() as conn:
        return getattr(ReadModels(conn, settings.read_schema), query)(*args)


def _jsonable(row: Any) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in dict(row).items()}


@keys_app.command("create")
def keys_create(
    workspace: str = typer.Option(DEFAULT_WORKSPACE, help="the key's workspace"),
    scope: list[str] = typer.Option(["admin"], "--scope", help="admin, train or infer (repeat)"),
    name: str | None = typer.Option(None, help="a label"),
) -> None:
    """Issue a key and print it (once: only its hash is kept)."""
    from api.bootstrap import issue_key

    try:
        key = issue_key(get_settings(), workspace_id=workspace, scopes=tuple(scope), name=name)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        fail(str(exc))
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    workspace: str = typer.Option(DEFAULT_WORKSPACE, help="whose keys"),
    output: OutputFormat = OUTPUT,
) -> None:
    """A workspace's keys: ids, names, scopes, prefixes (never a secret)."""
    rows = [_jsonable(r) for r in _rows("api_keys", workspace)]
    columns = [Column("key_id"), Column("name", kind="text"), Column("scopes"), Column("created"),
               Column("revoked")]  # fmt: skip
    cells = [
        [r["key_id"], r["name"], ",".join(r["scopes"]), when(r["created_at"]),
         when(r["revoked_at"])]
        for r in rows
    ]  # fmt: skip
    emit(output, rows, [Listing(columns, cells, title=f"API keys of {workspace}")])


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="the key id (the part after tml-)"),
    reason: str | None = typer.Option(None, help="why, for the audit trail"),
) -> None:
    """Revoke a key: it stops authenticating at once."""
    from commands.access import RevokeApiKey, aggregate_id_of
    from commands.envelope import CommandEnvelope
    from events.ids import new_event_id

    row = _rows("api_key", key_id)
    if row is None:
        fail(f"api key {key_id} not found")
        return
    _send(
        CommandEnvelope(
            command_id=f"revoke-key:{new_event_id()}",
            type="RevokeApiKey",
            aggregate_id=aggregate_id_of(row["workspace_id"]),
            actor="operator",
            workspace_id=row["workspace_id"],
            payload=RevokeApiKey(key_id=key_id, reason=reason).model_dump(mode="json"),
        )
    )
    stdout_console().print(Text(f"revoked {key_id}"))


@workspaces_app.command("create")
def workspaces_create(
    workspace_id: str = typer.Argument(..., help="lowercase letters, digits and dashes"),
    name: str | None = typer.Option(None, help="a display name"),
) -> None:
    """Create a workspace (a tenant: its keys see only its own resources)."""
    from commands.access import aggregate_id_of
    from commands.envelope import CommandEnvelope
    from events.ids import new_event_id

    _send(
        CommandEnvelope(
            command_id=f"create-workspace:{new_event_id()}",
            type="CreateWorkspace",
            aggregate_id=aggregate_id_of(workspace_id),
            actor="operator",
            payload={"name": name},
        )
    )
    stdout_console().print(Text(f"created workspace {workspace_id}"))


@workspaces_app.command("list")
def workspaces_list(output: OutputFormat = OUTPUT) -> None:
    """Every workspace (`default` always exists)."""
    rows = [
        {"workspace_id": DEFAULT_WORKSPACE, "name": None, "created_at": None},
        *(_jsonable(r) for r in _rows("workspaces")),
    ]
    cells = [
        [r["workspace_id"], r["name"] or ("(always exists)" if r["created_at"] is None else None),
         when(r["created_at"])]
        for r in rows
    ]  # fmt: skip
    columns = [Column("workspace_id"), Column("name", kind="text"), Column("created")]
    emit(output, rows, [Listing(columns, cells, title="workspaces")])
