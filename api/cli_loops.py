"""`loopstream api`, and `loopstream sessions|runs|checkpoints ...`: the Loops resources, read
and changed through the REST API with the SDK (so they work against any deployment).

Tables for a person, `-o json` for a script (infra/cli_output.py); errors on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from api.client import ChecksumMismatchError, LoopsError, MissingApiKeyError, ServiceClient
from api.config import get_api_settings
from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit, fail, when

sessions_app = typer.Typer(no_args_is_help=True, help="Loops sessions: list, show, end.")
runs_app = typer.Typer(
    no_args_is_help=True, help="Loops runs (a trainer and its sampler): list, show, syncs."
)
checkpoints_app = typer.Typer(
    no_args_is_help=True,
    help="Loops checkpoints: list, show, files, download, promote, delete.",
)


def serve_api(
    host: str | None = typer.Option(None, help="listen address (default: LOOPSTREAM_API_HOST)"),
    port: int | None = typer.Option(None, help="listen port (default: LOOPSTREAM_API_PORT)"),
) -> None:
    """Serve the Loops REST API (OpenAPI at /docs)."""
    from rich.console import Console

    settings = get_api_settings()
    updates: dict[str, Any] = {}
    if host:
        updates["api_host"] = host
    if port:
        updates["api_port"] = port
    # Re-validated, so a non-loopback host still refuses the development secret.
    if updates:
        settings = settings.model_validate({**settings.model_dump(), **updates})
    # Loading the app takes seconds: say so at once, and again when it listens (on stderr).
    say = Console(stderr=True, emoji=False, highlight=False).print
    plain: dict[str, Any] = {"markup": False, "soft_wrap": True}  # one line, as written
    say(f"starting the API on http://{settings.api_host}:{settings.api_port} ...", **plain)
    from api.app import serve

    serve(settings, announce=lambda line: say(line, **plain))


def _client(base_url: str | None) -> ServiceClient:
    return ServiceClient(base_url or get_api_settings().base_url)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except LoopsError as exc:
        fail(exc.detail)
    except (MissingApiKeyError, ChecksumMismatchError) as exc:
        fail(str(exc))
    except Exception as exc:  # connection refused and the like: say where we looked
        fail(f"{exc} (is `loopstream api` running?)")


def _wait(future: Any, what: str, *, timeout: float = 60.0) -> Any:
    """A future's result; a rejection or failure (its reason quotes the rule) exits 1."""
    try:
        return future.result(timeout=timeout)
    except Exception as exc:
        fail(f"{what}: {exc}")


BASE_URL = typer.Option(None, "--base-url", help="API base URL (default: LOOPSTREAM_API_BASE_URL)")


def _runs_listing(runs: list[dict[str, Any]], *, title: str | None = "runs") -> Listing:
    columns = [Column("run"), Column("session"), Column("sampler"), Column("status"),
               Column("max_seq_len", justify="right"), Column("lora_rank", justify="right"),
               Column("from"), Column("created")]  # fmt: skip
    rows = [
        [r["run_id"], r["session_id"], r["sampler_id"], r["status"], r["max_seq_len"],
         r["lora_rank"], r["from_checkpoint"], when(r["created_at"])]
        for r in runs
    ]  # fmt: skip
    return Listing(columns, rows, title=title)


def _checkpoints_listing(
    checkpoints: list[dict[str, Any]], *, title: str | None = "checkpoints"
) -> Listing:
    columns = [Column("checkpoint"), Column("uri"), Column("type"),
               Column("status"), Column("files", justify="right"),
               Column("bytes", justify="right"), Column("step", justify="right"),
               Column("promoted"), Column("created")]  # fmt: skip
    rows = []
    for c in checkpoints:
        kind = c.get("checkpoint_type") or c.get("kind") or "-"
        if c.get("chain_position"):
            kind += f" #{c['chain_position']}"
        rows.append(
            [c["checkpoint_id"], c["uri"], kind, c["status"], len(c["files"]),
             f"{c['total_size_bytes']:,}", c["step"], ",".join(c.get("promoted_to") or []),
             when(c["created_at"])]
        )  # fmt: skip
    return Listing(columns, rows, title=title)


def _ms(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


# --- sessions -------------------------------------------------------------------------------------


@sessions_app.command("list")
def sessions_list(
    status: str | None = typer.Option(None, help="active or ended"),
    limit: int = typer.Option(100, min=1, max=1000),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """The workspace's sessions, newest first."""
    sessions = _call(_client(base_url).list_sessions, status=status, limit=limit)
    columns = [Column("session"), Column("base model"), Column("project", kind="text"),
               Column("name", kind="text"), Column("status"), Column("created")]  # fmt: skip
    rows = [
        [s["session_id"], s["base_model"], s["project"], s["name"], s["status"],
         when(s["created_at"])]
        for s in sessions
    ]  # fmt: skip
    emit(output, sessions, [Listing(columns, rows, title="sessions")])


@sessions_app.command("show")
def sessions_show(
    session_id: str, output: OutputFormat = OUTPUT, base_url: str | None = BASE_URL
) -> None:
    """One session with its runs and checkpoints."""
    s = _call(_client(base_url).get_session, session_id)
    header = Text.assemble(
        ("session ", "bold"), (s["session_id"], "bold"), "  name ", s["name"] or "-",
        "  project ", s["project"] or "-", "  base model ", s["base_model"],
        "  status ", s["status"], f"  ({s['end_reason']})" if s["end_reason"] else "",
    )  # fmt: skip
    emit(output, s, [header, _runs_listing(s["runs"]), _checkpoints_listing(s["checkpoints"])])


@sessions_app.command("end")
def sessions_end(
    session_id: str,
    reason: str = typer.Option("ended by user", help="why (kept on the session)"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """End a session: its runs and samplers stop and their workers release them."""
    future = _call(_client(base_url).end_session, session_id, reason=reason)
    result = _wait(future, f"session {session_id} not ended")
    emit(output, result, [Text(f"session {session_id} ended ({reason})")])


# --- runs -----------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    limit: int = typer.Option(100, min=1, max=1000),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """The workspace's runs, newest first, across its sessions."""
    runs = _call(_client(base_url).list_runs, limit=limit)
    emit(output, runs, [_runs_listing(runs)])


@runs_app.command("show")
def runs_show(run_id: str, output: OutputFormat = OUTPUT, base_url: str | None = BASE_URL) -> None:
    """One run and its live checkpoints (JSON: the run, with `checkpoints`)."""
    client = _client(base_url)
    run = _call(client.get_run, run_id)
    checkpoints = _call(client.list_checkpoints, run_id)
    emit(
        output,
        {**run, "checkpoints": checkpoints},
        [_runs_listing([run], title=None), _checkpoints_listing(checkpoints)],
    )


@runs_app.command("syncs")
def runs_syncs(
    run_id: str,
    limit: int = typer.Option(20, min=1, max=500),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """The weight syncs of a run's sampler, newest first, and what it serves now.

    JSON: the sampler's weights state, with `syncs`."""
    client = _client(base_url)
    sampler_id = _call(client.get_run, run_id)["sampler_id"]
    state = _call(client.get_sampler_weights, sampler_id)
    syncs = _call(client.list_weight_syncs, sampler_id, limit=limit)
    header = Text.assemble(
        ("sampler ", "bold"), (sampler_id, "bold"), f"  ready {state['ready']}  serving version ",
        f"{state['serving_version']} ({state['serving_checkpoint_id'] or 'base model'})  ",
        f"newest sync {state['target_version']}",
        ("  pending" if state["pending"] else "", "yellow"),
    )  # fmt: skip
    columns = [Column("version", justify="right"), Column("checkpoint"), Column("type"),
               Column("status"), Column("bytes", justify="right"),
               Column("fetch ms", justify="right"), Column("apply ms", justify="right"),
               Column("total ms", justify="right"), Column("warmup"),
               Column("reason", kind="text")]  # fmt: skip
    rows = [
        [s["weights_version"], s["checkpoint_id"], s["checkpoint_type"], s["status"],
         f"{s['bytes_moved']:,}" if s["bytes_moved"] is not None else None,
         _ms(s["fetch_ms"]), _ms(s["apply_ms"]), _ms(s["total_ms"]),
         f"{s['warmup_attempts']} try" if s["warmup_attempts"] else None, s["reason"]]
        for s in syncs
    ]  # fmt: skip
    emit(
        output,
        {**state, "sampler_id": sampler_id, "syncs": syncs},
        [header, Listing(columns, rows, title="weight syncs")],
    )


# --- checkpoints ----------------------------------------------------------------------------------


@checkpoints_app.command("list")
def checkpoints_list(
    run_id: str,
    include_deleted: bool = typer.Option(False, help="also deleted/expired ones"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """The checkpoints of a run."""
    checkpoints = _call(_client(base_url).list_checkpoints, run_id, include_deleted=include_deleted)
    emit(output, checkpoints, [_checkpoints_listing(checkpoints)])


@checkpoints_app.command("show")
def checkpoints_show(
    checkpoint_id: str, output: OutputFormat = OUTPUT, base_url: str | None = BASE_URL
) -> None:
    """One checkpoint and its recorded files (size and sha256)."""
    c = _call(_client(base_url).get_checkpoint, checkpoint_id)
    files = Listing(
        [Column("file"), Column("bytes", justify="right"), Column("sha256")],
        [[f["relative_file_name"], f"{f['size_bytes']:,}", f["sha256"]] for f in c["files"]],
        title="files",
    )
    emit(output, c, [_checkpoints_listing([c], title=None), files])


@checkpoints_app.command("files")
def checkpoints_files(
    checkpoint_id: str,
    page_size: int = typer.Option(100, min=1, max=1000),
    urls: bool = typer.Option(False, help="print the presigned URLs too (JSON always has them)"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Every file of a checkpoint with a presigned URL (walks the paginated listing)."""
    client = _client(base_url)
    files = _call(lambda: list(client.iter_checkpoint_files(checkpoint_id, page_size=page_size)))
    columns = [Column("file"), Column("bytes", justify="right"), *([Column("url")] if urls else [])]
    rows = [
        [f["relative_file_name"], f"{f['size_bytes']:,}", *([f["url"]] if urls else [])]
        for f in files
    ]
    emit(output, files, [Listing(columns, rows, title=f"checkpoint {checkpoint_id}")])


@checkpoints_app.command("download")
def checkpoints_download(
    checkpoint_id: str,
    dest: Path | None = typer.Argument(
        None, help="folder to write the files into (default: ./<checkpoint_id>)", show_default=False
    ),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Download every file of a checkpoint, each verified against its recorded sha256.

    Through the presigned URLs, as the SDK's `ServiceClient.download_checkpoint` does."""
    client = _client(base_url)
    root = _call(client.download_checkpoint, checkpoint_id, dest or Path(checkpoint_id))
    files = _call(client.get_checkpoint, checkpoint_id)["files"]
    written = [
        {"path": str(Path(root) / f["relative_file_name"]), "size_bytes": f["size_bytes"],
         "sha256": f["sha256"]}
        for f in files
    ]  # fmt: skip
    listing = Listing(
        [Column("path"), Column("bytes", justify="right"), Column("sha256")],
        [[w["path"], f"{w['size_bytes']:,}", w["sha256"]] for w in written],
        title=f"checkpoint {checkpoint_id}: {len(written)} files verified",
    )
    emit(output, {"checkpoint_id": checkpoint_id, "dest": str(root), "files": written}, [listing])


@checkpoints_app.command("promote")
def checkpoints_promote(
    checkpoint_id: str,
    environment: str = typer.Option("production", help="the environment to promote to"),
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Promote a sampler checkpoint (a base, or any LoRA one) to an environment."""
    future = _call(_client(base_url).promote_checkpoint, checkpoint_id, environment=environment)
    result = _wait(future, "not promoted")  # a rejection quotes the promotability rule
    emit(output, result, [Text(f"checkpoint {checkpoint_id} promoted to {environment}")])


@checkpoints_app.command("delete")
def checkpoints_delete(
    checkpoint_id: str,
    output: OutputFormat = OUTPUT,
    base_url: str | None = BASE_URL,
) -> None:
    """Delete a checkpoint: it leaves the listings, and the janitor removes its files."""
    future = _call(_client(base_url).delete_checkpoint, checkpoint_id)
    result = _wait(future, f"checkpoint {checkpoint_id} not deleted")
    emit(output, result, [Text(f"checkpoint {checkpoint_id} deleted")])
