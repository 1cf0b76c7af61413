"""`loopstream` command line: the local stack, migrations and the demo."""

from __future__ import annotations

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


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"loopstream {version('loopstream')}")
        raise typer.Exit()


@app.callback()
def main(
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """loopstream: event-sourced RL control plane."""


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

from api.cli_models import models_app  # noqa: E402

app.add_typer(models_app, name="models")

# --- models and deployments (api/cli_deployments.py) ---
from api.cli_deployments import deploy_checkpoints, deployments_app  # noqa: E402

app.command("deploy-checkpoints")(deploy_checkpoints)
app.add_typer(deployments_app, name="deployments")

# --- the logs of the stack's servers and loopstream's services (api/cli_logs.py) ---
from api.cli_logs import show_logs  # noqa: E402

app.command("logs")(show_logs)

from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, emit  # noqa: E402

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
def stack_status(output: OutputFormat = OUTPUT) -> None:
    """Show which servers run, their pids, and whether they answer (exit 1 if one does not)."""
    from dataclasses import asdict

    from infra.stack import LocalStack

    statuses = LocalStack(get_settings()).status()
    rows = [[s.name, s.pid, "yes" if s.ready else "no", s.endpoint] for s in statuses]
    listing = Listing([Column("service"), Column("pid"), Column("ready"), Column("endpoint")], rows)
    emit(output, [asdict(s) for s in statuses], [listing])
    if not all(status.ready for status in statuses):
        raise typer.Exit(code=1)


@stack_app.command("logs")
def stack_logs(
    service: str = typer.Argument("kafka", help="any service `loopstream logs` names"),
    lines: int = typer.Option(50, "-n", "--lines", min=0, help="how many lines from the end"),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
) -> None:
    """Print a service's log: the same as `loopstream logs`."""
    show_logs(service, lines=lines, follow=follow)


@stack_app.command("topics")
def stack_topics(output: OutputFormat = OUTPUT) -> None:
    """Create missing topics and align configs with the declared catalog; print what changed."""
    from dataclasses import asdict

    from infra.topics import provision_topics

    report = asdict(provision_topics(get_settings()))
    rows = [[what, ", ".join(topics)] for what, topics in report.items()]
    emit(output, report, [Listing([Column("action"), Column("topics", kind="text")], rows)])


from infra.services import SERVICES  # noqa: E402

services_app = typer.Typer(
    no_args_is_help=True,
    help=f"loopstream's own processes: {', '.join(s.name for s in SERVICES)}.",
)
app.add_typer(services_app, name="services")


@services_app.command("up")
def services_up() -> None:
    """Start every service that is not running, in the background (idempotent).

    Waits until the API answers, and makes sure the default workspace's admin key exists."""
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
    """Stop every service and what it started (by recorded pid)."""
    from infra.services import services_down as stop

    stopped = stop(get_settings())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(output: OutputFormat = OUTPUT) -> None:
    """Which of them run, with pids; exit 1 if one does not.

    Also the records the projection could not apply (JSON: `projection_failures`, null when
    unknown)."""
    from infra.services import services_status as status
    from infra.services import services_strays

    settings = get_settings()
    strays = services_strays(settings)  # a leader died (kill -9) and left these running
    services = [
        {"name": name, "pid": pid, "running": pid is not None, "left_running": strays.get(name, [])}
        for name, pid in status(settings).items()
    ]
    rows = [
        [s["name"], s["pid"], "yes" if s["running"] else "no",
         ", ".join(map(str, s["left_running"])) + " (`services down` ends them)"
         if s["left_running"] else None]
        for s in services
    ]  # fmt: skip
    columns = [Column("service"), Column("pid"), Column("running"), Column("left running", "text")]
    if output == OutputFormat.json:
        from sqlalchemy.exc import SQLAlchemyError

        from projections.db import get_engine
        from projections.health import count_failures

        try:
            failures: int | None = count_failures(get_engine(settings), settings.read_schema)
        except SQLAlchemyError:
            failures = None
        emit(output, {"services": services, "projection_failures": failures}, [])
    else:
        emit(output, services, [Listing(columns, rows)])
        # A projection that runs can still have skipped records: say so, with the latest ones.
        from projections.cli import print_failures

        print_failures(settings.read_schema, limit=5)
    if not all(s["running"] for s in services):
        raise typer.Exit(code=1)


@db_app.command("migrate")
def db_migrate(revision: str = typer.Argument("head")) -> None:
    """Apply the alembic migrations of the read models."""
    from projections.db import migrate

    migrate(get_settings(), revision)
    console.print(f"database at {revision}")


audit_app = typer.Typer(no_args_is_help=True, help="Read the event log: history, tail.")
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
def smoke(
    output: OutputFormat = OUTPUT,
    base_url: str | None = typer.Option(
        None, "--base-url", help="API base URL (default: LOOPSTREAM_API_BASE_URL)"
    ),
) -> None:
    """Health check of every service: one short session through the REST API, then ended.

    The steps: create a session and a run (trainer and sampler), sample 4 tokens (sampler
    worker), forward_backward and optim_step (trainer worker), save and hotload sampler weights
    (S3 store), read the checkpoint back, end the session. Exit 1 naming the first step that
    failed."""
    from rich.text import Text

    from api.client import ServiceClient
    from api.smoke import SmokeError, run_smoke

    out = Console(highlight=False, emoji=False)

    def progress(step: dict) -> None:  # table output: each step as it passes
        out.print(Text(f"ok  {step['step']}  ({step['ms']:.0f} ms)  {step['detail']}"))

    try:
        with ServiceClient(base_url) as client:
            report = run_smoke(client, on_step=progress if output == OutputFormat.table else None)
    except (SmokeError, RuntimeError) as exc:
        _fail(exc)
        return
    result = report.as_dict()
    emit(output, result, [Text(f"smoke passed in {result['total_ms'] / 1000:.1f}s")])


if __name__ == "__main__":
    app()
