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
from rich.table import Table

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
        child = subprocess.Popen(command)
        code = child.wait()
        if stopping:
            raise typer.Exit(code=0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else code)
        # The runner exits on purpose to resume from PostgreSQL (EXIT_RESYNC); any other exit is
        # a crash, restarted too, a little later so a persistent fault does not spin.
        delay = 0.5 if code == EXIT_RESYNC else 5.0
        console.print(f"[yellow]runner exited with {code}[/]; restarting in {delay}s")
        time.sleep(delay)


@projections_app.command("status")
def status(projection: str = typer.Option("loops")) -> None:
    """Stored positions of a projection against the end of its topics (lag)."""
    from confluent_kafka import Consumer, TopicPartition

    from projections.db import get_engine
    from projections.names import topics_for
    from projections.replay import positions_of

    settings = get_settings()
    stored = positions_of(get_engine(settings), projection)
    topics = topics_for(settings)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "cli"})
    table = Table("topic", "partition", "next offset", "end offset", "lag", title=projection)
    try:
        metadata = consumer.list_topics(timeout=10)
        for topic in (topics.events, topics.command_results):
            for partition in sorted(metadata.topics[topic].partitions):
                tp = TopicPartition(topic, partition)
                end = consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                position = stored.get((topic, partition), 0)
                # A transaction's commit marker takes the last offset and is never delivered.
                lag = max(end - position - 1, 0) if end else 0
                table.add_row(topic, str(partition), str(position), str(end), f"~{lag}")
    finally:
        consumer.close()
    Console().print(table)


def replay(
    projection: str = typer.Option("loops", help="the live projection (= its schema)"),
    from_time: Annotated[
        datetime | None,
        typer.Option(help="replay only events at or after this time (ISO 8601); no --swap then"),
    ] = None,
    swap: bool = typer.Option(False, "--swap", help="make the replayed shadow the live schema"),
    check: bool = typer.Option(False, "--check", help="exit 1 when shadow and live differ"),
    batch_size: int = typer.Option(10_000, help="records per PostgreSQL transaction"),
    workers: int = typer.Option(2, help="replay processes; partitions are shared among them"),
) -> None:
    """Rebuild a projection into `<projection>__shadow`, compare it with the live one, swap."""
    from projections.db import get_engine
    from projections.replay import compare, positions_of, replay_into_shadow
    from projections.replay import swap as swap_schemas

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
    elif check and not matches:
        raise typer.Exit(code=1)


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)
