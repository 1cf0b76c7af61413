"""`loopstream` command line: the local stack, migrations and the demo."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.processes import StackError
from infra.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="loopstream: event-sourced RL control plane.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack: Kafka, PostgreSQL, S3.")
db_app = typer.Typer(no_args_is_help=True, help="PostgreSQL read-model schema.")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")

# --- projections (projections/cli.py) ---
from projections.cli import projections_app, replay  # noqa: E402

app.add_typer(projections_app, name="projections")
app.command("replay")(replay)

# --- the Loops REST API and its resources (api/cli_loops.py) ---
from api.cli_loops import checkpoints_app, runs_app, serve_api, sessions_app  # noqa: E402

app.command("api")(serve_api)
app.add_typer(sessions_app, name="sessions")
app.add_typer(runs_app, name="runs")
app.add_typer(checkpoints_app, name="checkpoints")

from api.cli_access import keys_app, workspaces_app  # noqa: E402

app.add_typer(keys_app, name="keys")
app.add_typer(workspaces_app, name="workspaces")

from api.cli_secrets import secrets_app  # noqa: E402

app.add_typer(secrets_app, name="secrets")

console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=1)


@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka, PostgreSQL and the S3 store (idempotent) and wait until they are ready."""
    from infra.stack import LocalStack

    stack = LocalStack(get_settings())
    started_at = time.monotonic()
    try:
        with console.status("starting the local stack..."):
            report = stack.up()
    except StackError as exc:
        _fail(exc)
        return
    for name in report.already_running:
        console.print(f"[yellow]{name}[/] already running, left as it is")
    for name in report.started:
        console.print(f"[green]{name}[/] started")
    if report.topics.created:
        console.print(f"topics created: {', '.join(report.topics.created)}")
    table = Table("service", "endpoint", title="loopstream local stack")
    for name, endpoint in stack.endpoints().items():
        table.add_row(name, endpoint)
    console.print(table)
    console.print(f"ready in {time.monotonic() - started_at:.1f}s")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the processes `stack up` started (by recorded pid), and nothing else."""
    from infra.stack import LocalStack

    stopped = LocalStack(get_settings()).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status() -> None:
    """Show which services run, their pids, and whether they answer."""
    from infra.stack import LocalStack

    statuses = LocalStack(get_settings()).status()
    table = Table("service", "pid", "ready", "endpoint")
    for status in statuses:
        ready = "[green]yes[/]" if status.ready else "[red]no[/]"
        table.add_row(status.name, str(status.pid or "-"), ready, status.endpoint)
    Console().print(table)
    if not all(status.ready for status in statuses):
        raise typer.Exit(code=1)


@stack_app.command("logs")
def stack_logs(
    service: str = typer.Argument("kafka", help="kafka, postgres or s3"),
    lines: int = typer.Option(50, "-n", help="how many lines from the end"),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
) -> None:
    """Print a service's log."""
    from infra.stack import LocalStack

    services = LocalStack(get_settings()).services
    if service not in services:
        _fail(ValueError(f"unknown service {service!r}; choose one of {', '.join(services)}"))
    log_file = services[service].process.log_file
    if follow:
        subprocess.run(["tail", "-n", str(lines), "-F", str(log_file)], check=False)
    else:
        sys.stdout.write(services[service].process.log_tail(lines) + "\n")


@stack_app.command("topics")
def stack_topics() -> None:
    """Create missing topics and align configs with the declared catalog."""
    from infra.topics import provision_topics

    report = provision_topics(get_settings())
    console.print(
        f"created {report.created}, reconfigured {report.reconfigured}, "
        f"repartitioned {report.repartitioned}, unchanged {report.unchanged}"
    )


services_app = typer.Typer(
    no_args_is_help=True, help="loopstream's own processes: command processor, projections."
)
app.add_typer(services_app, name="services")


@services_app.command("up")
def services_up() -> None:
    """Start the command processor and the projection runner in the background (idempotent)."""
    from infra.services import services_up as start

    try:
        for name, what in start(get_settings()).items():
            console.print(f"{name}: {what}")
    except StackError as exc:
        _fail(exc)
    from api.bootstrap import ensure_default_key, key_file

    try:  # the default workspace's admin key, for the SDK, CLI and examples
        ensure_default_key(get_settings())
    except (RuntimeError, TimeoutError) as exc:
        _fail(exc)
    console.print(f"default API key: {key_file(get_settings())}")


@services_app.command("down")
def services_down() -> None:
    """Stop them (by recorded pid)."""
    from infra.services import services_down as stop

    stopped = stop(get_settings())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status() -> None:
    """Which of them run, with pids; and the records the projection could not apply."""
    from infra.services import services_status as status
    from infra.services import services_strays

    strays = services_strays(get_settings())
    for name, pid in status(get_settings()).items():
        console.print(f"{name}: {'pid ' + str(pid) if pid else '[red]not running[/]'}")
        if name in strays:  # its leader died (kill -9) and left these running
            pids = ", ".join(map(str, strays[name]))
            console.print(f"  [red]left running: pids {pids}[/] (`services down` ends them)")
    # A projection that runs can still have skipped records: say so, with the latest ones.
    from projections.cli import print_failures

    print_failures(get_settings().read_schema, limit=5)


@db_app.command("migrate")
def db_migrate(revision: str = typer.Argument("head")) -> None:
    """Apply the alembic migrations of the read models."""
    from projections.db import migrate

    migrate(get_settings(), revision)
    console.print(f"database at {revision}")


audit_app = typer.Typer(no_args_is_help=True, help="Read the event log: history, state, tail.")
app.add_typer(audit_app, name="audit")


@audit_app.command("history")
def audit_history(
    resource_id: str = typer.Argument(
        ...,
        metavar="ID",
        help="a session, run, sampler, workspace, secret (secret:<workspace>:<name>), API key "
        "id, Tinker session or Tinker model id",
    ),
    as_of_sequence: int | None = typer.Option(None, help="state after this sequence number"),
    as_of: datetime | None = typer.Option(None, help="state as of this time (ISO 8601, UTC)"),
    workspace: str | None = typer.Option(
        None, help="only this workspace's events (another workspace's aggregate has none)"
    ),
) -> None:
    """Full history of what an id names, with causation chains, and its state at a point.

    An id that names several aggregates (a Tinker session: its models' sessions, runs and
    samplers) prints each in turn."""
    from rich.text import Text
    from rich.tree import Tree

    from api.audit import subjects
    from events.audit import causation_forest, to_jsonable

    found = subjects(get_settings(), resource_id, workspace=workspace)
    if not found:
        _fail(ValueError(f"no events for {resource_id!r}"))
    out = Console()
    at = as_of.replace(tzinfo=as_of.tzinfo or UTC) if as_of else None
    for subject in found:
        title = Text(f"{subject.kind} {subject.id}", style="bold")
        tree = Tree(title.append(f" ({len(subject.events)} events)", style="not bold"))

        def add(branch: Tree, nodes: list) -> None:
            for node in nodes:
                add(branch.add(Text(node.label)), node.children)

        add(tree, causation_forest(subject.events))
        out.print(tree)
        out.print_json(data=to_jsonable(subject.state(sequence=as_of_sequence, at=at)))


@audit_app.command("tail")
def audit_tail(
    event_type: str | None = typer.Option(None, "--type", help="only this event type"),
    aggregate_id: str | None = typer.Option(None, "--aggregate", help="only this aggregate"),
    correlation_id: str | None = typer.Option(None, "--correlation", help="only this conversation"),
    from_beginning: bool = typer.Option(False, help="start at the oldest event, not the newest"),
    workspace: str | None = typer.Option(None, help="only this workspace's events"),
) -> None:
    """Print events as they are committed, one JSON object per line."""
    from events.audit import tail

    for envelope in tail(
        get_settings(),
        event_type=event_type,
        aggregate_id=aggregate_id,
        correlation_id=correlation_id,
        workspace=workspace,
        from_beginning=from_beginning,
    ):
        sys.stdout.write(envelope.model_dump_json() + "\n")
        sys.stdout.flush()


@app.command("schemas")
def export_schemas() -> None:
    """Write the JSON Schemas of every command and event to docs/schemas/."""
    from events.schemas import export

    written = export()
    console.print(f"wrote {len(written)} schemas to docs/schemas/")


@app.command("process-commands")
def process_commands() -> None:
    """Run the command processor (exactly-once: commands in, events and results out)."""
    from commands.processor import run_forever
    from infra.logs import configure_logging

    configure_logging()
    run_forever(get_settings())


@app.command("smoke")
def smoke() -> None:
    """Send one command through Kafka and read its effect back from a PostgreSQL projection."""
    from api.smoke import run_smoke

    try:
        result = run_smoke(get_settings())
    except StackError as exc:
        _fail(exc)
        return
    console.print(result)


if __name__ == "__main__":
    app()
