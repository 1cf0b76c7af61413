"""CLI of the projections: `loopstream projections run|status` and `loopstream replay`.

Mounted by `api/cli.py`; kept here so the projection commands live with the projections.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.cli_output import OUTPUT, Column, Listing, OutputFormat, print_json
from infra.processes import die_with_parent
from infra.settings import get_settings

projections_app = typer.Typer(
    no_args_is_help=True, help="Projections: the event log into PostgreSQL read models."
)
console = Console(stderr=True)


@projections_app.command("run")
def run(
    projection: str = typer.Option("loops", help="projection name (= its PostgreSQL schema)"),
    batch_size: int = typer.Option(2000, help="events per PostgreSQL transaction, at most"),
    within: float = typer.Option(0.01, help="seconds a partial batch waits for more events"),
    supervise: bool = typer.Option(
        True, help="restart the runner when it exits to resync from PostgreSQL"
    ),
) -> None:
    """Run the faust projection runner (until Ctrl-C)."""
    from projections.runner import EXIT_RESYNC, RunnerConfig
    from projections.runner import run as run_runner

    if not supervise:
        run_runner(get_settings(), RunnerConfig(projection, batch_size, within))
        return
    command = [
        sys.executable, "-m", "projections.runner", "--projection", projection,
        "--batch-size", str(batch_size), "--within", str(within),
    ]  # fmt: skip
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        # The runner dies with this supervisor, even on kill -9: never an unsupervised second
        # runner next to the one the next `services up` starts.
        child = subprocess.Popen(command, preexec_fn=die_with_parent())
        code = child.wait()
        if stopping:
            raise typer.Exit(code=0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else code)
        # The runner exits on purpose to resume from PostgreSQL (EXIT_RESYNC); any other exit is
        # a crash, restarted too, a little later so a persistent fault does not spin.
        delay = 0.5 if code == EXIT_RESYNC else 5.0
        console.print(f"[yellow]runner exited with {code}[/]; restarting in {delay}s")
        time.sleep(delay)


@projections_app.command("status")
def status(
    projection: str = typer.Option("loops"),
    failures: int = typer.Option(10, help="how many of the latest failures to list"),
    output: OutputFormat = OUTPUT,
) -> None:
    """Stored positions against the end of its topics (lag), and the records it could not apply."""
    from confluent_kafka import KafkaException

    from projections.db import get_engine
    from projections.health import count_failures, end_offsets, partition_lag
    from projections.store import positions_of

    settings = get_settings()
    engine = get_engine(settings)
    stored = positions_of(engine, projection)
    try:
        ends = end_offsets(settings, timeout_s=10)
    except KafkaException as exc:
        console.print(f"[red]Kafka did not answer[/]: {escape(str(exc))}")
        ends = {}
    partitions = [
        {"topic": topic, "partition": partition, "next_offset": stored.get((topic, partition), 0),
         "end_offset": end, "lag": partition_lag(end, stored.get((topic, partition), 0))}
        for (topic, partition), end in sorted(ends.items())
    ]  # fmt: skip
    if output == OutputFormat.json:
        print_json({"projection": projection, "partitions": partitions,
                    "failures": count_failures(engine, projection)})  # fmt: skip
        return
    rows = [[p["topic"], p["partition"], p["next_offset"], p["end_offset"], f"~{p['lag']}"]
            for p in partitions]  # fmt: skip
    columns = [Column("topic"), Column("partition", justify="right"),
               Column("next offset", justify="right"), Column("end offset", justify="right"),
               Column("lag", justify="right")]  # fmt: skip
    Listing(columns, rows, title=projection).print()
    print_failures(projection, limit=failures)


def print_failures(projection: str, *, limit: int = 10) -> int | None:
    """The projection's failure count and latest failures; returns the count (None: unknown).

    Also what `loopstream services status` shows under the projections service.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from projections.db import get_engine
    from projections.health import count_failures, latest_failures

    engine = get_engine(get_settings())
    out = Console()
    try:
        count = count_failures(engine, projection)
        latest = latest_failures(engine, projection, limit=limit) if count else []
    except SQLAlchemyError as exc:
        out.print(f"{projection} failures: [red]unknown[/] ({type(exc).__name__}; migrated?)")
        return None
    if not count:
        out.print(f"{projection} failures: [green]0[/] (the read models hold every log record)")
        return 0
    out.print(
        f"{projection} failures: [red]{count}[/] log records not applied: the read models "
        "differ from the log (degraded); replay after fixing the cause"
    )
    table = Table(
        "logged at", "record", "aggregate", "type", "event id", "error", "reason",
        title=f"latest {len(latest)} of {count} failures",
    )  # fmt: skip
    for f in latest:
        cells = (
            f.logged_at.isoformat(timespec="seconds") if f.logged_at else "-",
            f"{f.topic}[{f.partition}]@{f.kafka_offset}",
            f.aggregate or "-",
            f.event_type or "-",
            f.event_id or "-",
            f.error_type,
            f.reason,
        )
        table.add_row(*(escape(cell) for cell in cells))  # the log's text is not rich markup
    out.print(table)
    return count


def replay(
    projection: str = typer.Option("loops", help="the live projection (= its schema)"),
    from_time: Annotated[
        datetime | None,
        typer.Option(help="replay only events at or after this time (ISO 8601); no --swap then"),
    ] = None,
    swap: bool = typer.Option(False, "--swap", help="make the replayed shadow the live schema"),
    check: bool = typer.Option(
        False,
        "--check",
        help="also compare the live read models with the log itself (events per aggregate); "
        "exit 1 when they differ, or when shadow and live differ",
    ),
    batch_size: int = typer.Option(10_000, help="records per PostgreSQL transaction"),
    workers: int = typer.Option(2, help="replay processes; partitions are shared among them"),
    workspace: str | None = typer.Option(
        None, help="--check only this workspace's events (the rebuild is always whole)"
    ),
) -> None:
    """Rebuild a projection into `<projection>__shadow`, compare it with the live one, swap.

    Shadow and live are built by the same projectors, so a record both skip goes unseen in that
    comparison: `--check` compares the live read models with the log too.
    """
    from projections.db import get_engine
    from projections.replay import compare, replay_into_shadow
    from projections.replay import swap as swap_schemas
    from projections.store import positions_of

    if swap and from_time is not None:
        console.print("[red]refusing --swap with --from-time[/]: the shadow misses older events")
        raise typer.Exit(code=2)
    settings = get_settings()
    engine = get_engine(settings)
    with console.status(f"replaying {projection} into its shadow..."):
        report = replay_into_shadow(
            settings,
            projection=projection,
            from_time=from_time,
            batch_size=batch_size,
            workers=workers,
        )
    console.print(
        f"replayed {report.records} records ({report.events} events, "
        f"{report.dead_letters} undecodable) into [bold]{report.shadow}[/] in "
        f"{report.seconds:.1f}s: {report.events_per_s:,.0f} events/s, "
        f"{report.records_per_s:,.0f} records/s"
    )
    comparisons = compare(engine, live=projection, shadow=report.shadow)
    table = Table(
        "table", "live rows", "shadow rows", "live checksum", "shadow checksum", "match",
        title=f"{projection} vs {report.shadow}",
    )  # fmt: skip
    for c in comparisons:
        table.add_row(
            c.table,
            _show(c.live_rows),
            _show(c.shadow_rows),
            c.live_checksum or "-",
            c.shadow_checksum or "-",
            "[green]yes[/]" if c.matches else "[red]no[/]",
        )
    Console().print(table)
    live_positions = positions_of(engine, projection)
    shadow_positions = positions_of(engine, report.shadow)
    moved = sorted(
        tp for tp in live_positions.keys() | shadow_positions.keys()
        if live_positions.get(tp) != shadow_positions.get(tp)
    )  # fmt: skip
    for topic, partition in moved:
        console.print(
            f"position {topic}[{partition}]: live {live_positions.get((topic, partition))}, "
            f"shadow {shadow_positions.get((topic, partition))} (the live runner moved on?)"
        )
    matches = all(c.matches for c in comparisons)
    if swap:
        swap_schemas(engine, live=projection, shadow=report.shadow)
        console.print(f"[green]swapped[/]: {report.shadow} is now {projection}")
    if check and not print_log_check(projection, workspace=workspace):
        raise typer.Exit(code=1)
    if check and not swap and not matches:
        raise typer.Exit(code=1)


@projections_app.command("check")
def check_log(
    projection: str = typer.Option("loops"),
    workspace: str | None = typer.Option(None, help="only this workspace's events"),
) -> None:
    """Compare the read models with the log itself (events per aggregate); exit 1 if they differ."""
    if not print_log_check(projection, workspace=workspace):
        raise typer.Exit(code=1)


def print_log_check(projection: str, *, limit: int = 20, workspace: str | None = None) -> bool:
    """Run `check_against_log`, print what differs; True when the read models equal the log."""
    from projections.check import check_against_log

    with console.status(f"reading the log to compare with {projection}..."):
        result = check_against_log(get_settings(), projection=projection, workspace=workspace)
    scope = f" (workspace {escape(workspace)})" if workspace else ""
    summary = (
        f"{projection}{scope} vs the log: {result.records} event records, "
        f"{result.aggregates} aggregates, up to the stored positions"
    )
    if result.matches:
        console.print(f"{summary}: [green]match[/]")
        return True
    console.print(
        f"{summary}: [red]MISMATCH[/] in {len(result.mismatches)} aggregates "
        "(see `loopstream projections status` for the records not applied)"
    )
    table = Table(
        "aggregate", "log events", "read model events", "log last seq", "read model last seq",
        "missing", title=f"aggregates whose events differ (first {limit})",
    )  # fmt: skip
    for m in result.mismatches[:limit]:
        table.add_row(
            escape(m.aggregate_id),
            _show(m.log.events if m.log else 0),
            _show(m.read_model.events if m.read_model else 0),
            _show(m.log.last_sequence if m.log else None),
            _show(m.read_model.last_sequence if m.read_model else None),
            str(m.missing),
        )
    Console().print(table)
    return False


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)
