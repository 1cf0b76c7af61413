"""`loopstream api`, and `loopstream sessions|runs|checkpoints ...`: the Loops resources as
tables, read through the REST API with the SDK (so they work against any deployment)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from api.client import LoopsError, MissingApiKeyError, ServiceClient
from api.config import get_api_settings

sessions_app = typer.Typer(no_args_is_help=True, help="Loops sessions.")
runs_app = typer.Typer(no_args_is_help=True, help="Loops runs (trainers) and their samplers.")
checkpoints_app = typer.Typer(no_args_is_help=True, help="Loops checkpoints and their files.")

out = Console()
err = Console(stderr=True)


def serve_api(
    host: str | None = typer.Option(None, help="listen address (default: LOOPSTREAM_API_HOST)"),
    port: int | None = typer.Option(None, help="listen port (default: LOOPSTREAM_API_PORT)"),
) -> None:
    """Serve the Loops REST API (OpenAPI at /docs)."""
    from api.app import serve

    settings = get_api_settings()
    updates: dict[str, Any] = {}
    if host:
        updates["api_host"] = host
    if port:
        updates["api_port"] = port
    # Re-validated, so a non-loopback host still refuses the development secret.
    serve(settings.model_validate({**settings.model_dump(), **updates}) if updates else settings)


def _client(base_url: str | None) -> ServiceClient:
    return ServiceClient(base_url or get_api_settings().base_url)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except LoopsError as exc:
        err.print(f"[bold red]error:[/] {exc.detail}")
        raise typer.Exit(code=1) from exc
    except MissingApiKeyError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=1) from exc
    except Exception as exc:  # connection refused and the like: say where we looked
        err.print(f"[bold red]error:[/] {exc} (is `loopstream api` running?)")
        raise typer.Exit(code=1) from exc


BASE_URL = typer.Option(None, "--base-url", help="API base URL (default: LOOPSTREAM_API_BASE_URL)")


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def _runs_table(runs: list[dict[str, Any]]) -> Table:
    table = Table("run", "sampler", "status", "max_seq_len", "lora_rank", "from", "created")
    for r in runs:
        table.add_row(
            r["run_id"], r["sampler_id"], r["status"], str(r["max_seq_len"]), str(r["lora_rank"]),
            r["from_checkpoint"] or "-", _when(r["created_at"]),
        )  # fmt: skip
    return table


def _checkpoints_table(checkpoints: list[dict[str, Any]]) -> Table:
    table = Table("checkpoint", "uri", "type", "status", "files", "bytes", "step", "promoted",
                  "created")  # fmt: skip
    for c in checkpoints:
        step = str(c["step"]) if c["step"] is not None else "-"
        kind = c.get("checkpoint_type") or "-"
        if c.get("chain_position"):
            kind += f" #{c['chain_position']}"
        table.add_row(
            c["checkpoint_id"], c["uri"], kind, c["status"], str(len(c["files"])),
            f"{c['total_size_bytes']:,}", step, ", ".join(c.get("promoted_to") or []) or "-",
            _when(c["created_at"]),
        )  # fmt: skip
    return table


def _ms(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


@sessions_app.command("list")
def sessions_list(
    status: str | None = typer.Option(None, help="active or ended"),
    limit: int = typer.Option(100, min=1, max=1000),
    base_url: str | None = BASE_URL,
) -> None:
    """All sessions, newest first."""
    sessions = _call(_client(base_url).list_sessions, status=status, limit=limit)
    table = Table("session", "base model", "project", "name", "status", "created", title="sessions")
    for s in sessions:
        table.add_row(s["session_id"], s["base_model"], s["project"] or "-", s["name"] or "-",
                      s["status"], _when(s["created_at"]))  # fmt: skip
    out.print(table)


@sessions_app.command("show")
def sessions_show(session_id: str, base_url: str | None = BASE_URL) -> None:
    """One session with its runs and checkpoints."""
    s = _call(_client(base_url).get_session, session_id)
    out.print(
        f"[bold]session {s['session_id']}[/]  base model {s['base_model']}  status {s['status']}"
        f"{'  (' + s['end_reason'] + ')' if s['end_reason'] else ''}"
    )
    out.print(_runs_table(s["runs"]))
    out.print(_checkpoints_table(s["checkpoints"]))


@runs_app.command("show")
def runs_show(run_id: str, base_url: str | None = BASE_URL) -> None:
    """One run and its active checkpoints."""
    client = _client(base_url)
    run = _call(client.get_run, run_id)
    out.print(_runs_table([run]))
    out.print(_checkpoints_table(_call(client.list_checkpoints, run_id)))


@runs_app.command("syncs")
def runs_syncs(
    run_id: str,
    limit: int = typer.Option(20, min=1, max=500),
    base_url: str | None = BASE_URL,
) -> None:
    """The weight syncs of a run's sampler, newest first, and what it serves now."""
    client = _client(base_url)
    sampler_id = _call(client.get_run, run_id)["sampler_id"]
    state = _call(client.get_sampler_weights, sampler_id)
    out.print(
        f"[bold]sampler {sampler_id}[/]  ready {state['ready']}  serving version "
        f"{state['serving_version']} ({state['serving_checkpoint_id'] or 'base model'})  "
        f"newest sync {state['target_version']}{'  [yellow]pending[/]' if state['pending'] else ''}"
    )
    table = Table("version", "checkpoint", "type", "status", "bytes", "fetch ms", "apply ms",
                  "total ms", "warmup", "reason", title="weight syncs")  # fmt: skip
    for s in _call(client.list_weight_syncs, sampler_id, limit=limit):
        warmup = f"{s['warmup_attempts']} try" if s["warmup_attempts"] else "-"
        table.add_row(
            str(s["weights_version"]), s["checkpoint_id"], s["checkpoint_type"] or "-",
            s["status"], f"{s['bytes_moved']:,}" if s["bytes_moved"] is not None else "-",
            _ms(s["fetch_ms"]), _ms(s["apply_ms"]), _ms(s["total_ms"]), warmup,
            s["reason"] or "",
        )  # fmt: skip
    out.print(table)


@checkpoints_app.command("promote")
def checkpoints_promote(
    checkpoint_id: str,
    environment: str = typer.Option("production", help="the environment to promote to"),
    base_url: str | None = BASE_URL,
) -> None:
    """Promote a sampler checkpoint (a base, or any LoRA one) to an environment."""
    client = _client(base_url)
    future = _call(client.promote_checkpoint, checkpoint_id, environment=environment)
    try:
        future.result(timeout=60)
    except Exception as exc:  # rejected: the reason quotes the promotability rule
        err.print(f"[bold red]not promoted:[/] {exc}")
        raise typer.Exit(code=1) from exc
    out.print(f"checkpoint {checkpoint_id} promoted to {environment}")


@checkpoints_app.command("list")
def checkpoints_list(
    run_id: str,
    include_deleted: bool = typer.Option(False, help="also deleted/expired ones"),
    base_url: str | None = BASE_URL,
) -> None:
    """The checkpoints of a run."""
    checkpoints = _call(_client(base_url).list_checkpoints, run_id, include_deleted=include_deleted)
    out.print(_checkpoints_table(checkpoints))


@checkpoints_app.command("files")
def checkpoints_files(
    checkpoint_id: str,
    page_size: int = typer.Option(100, min=1, max=1000),
    urls: bool = typer.Option(False, help="print the presigned URLs too"),
    base_url: str | None = BASE_URL,
) -> None:
    """Every file of a checkpoint (walks the paginated presigned URLs)."""
    client = _client(base_url)
    files = _call(lambda: list(client.iter_checkpoint_files(checkpoint_id, page_size=page_size)))
    table = Table("file", "bytes", *(["url"] if urls else []), title=f"checkpoint {checkpoint_id}")
    for f in files:
        table.add_row(
            f["relative_file_name"], f"{f['size_bytes']:,}", *([f["url"]] if urls else [])
        )
    out.print(table)
