"""Projection apply rate vs a raw psycopg COPY of the same rows, and replay rate, in one run.

    .venv/bin/python benchmarks/projection_rate.py [--events 100000] [--sessions 1000]

On its own topic prefix and its own scratch database (the shared stack stays untouched):
1. produce N events and N command results transactionally (as the command processor does);
2. apply:  decode + project + merge + COPY/upsert + positions, in batches, from records already
           in memory (the projection's own cost into PostgreSQL);
   copy:   a raw psycopg COPY of exactly the rows the apply produced, into an identical clone of
           the schema (same keys and indexes), one COPY per table, no conflict handling;
3. runner: the faust runner as a process, from an empty database to caught up (end to end);
4. replay: `replay_into_shadow` from offset 0 (Kafka read + apply + index build + analyze).
Writes benchmarks/results/projection_rate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.settings import Settings, get_settings  # noqa: E402
from projections.db import get_engine  # noqa: E402
from projections.loops import TABLES  # noqa: E402
from projections.names import topics_for  # noqa: E402
from projections.pipeline import SourceRecord, overlapped, plan_batch, relax_gc  # noqa: E402
from projections.replay import create_shadow, replay_into_shadow  # noqa: E402
from projections.rows import merge_changes  # noqa: E402
from projections.store import ReadModelWriter, _with_json, json_encoders  # noqa: E402
from tests.integration.projection_support import (  # noqa: E402
    Isolated,
    caught_up,
    isolated_slice,
    produce,
    start_runner,
    stop,
    wait_for,
)

RESULTS = REPO / "benchmarks" / "results" / "projection_rate.json"


def read_all(settings: Settings) -> list[SourceRecord]:
    topics = topics_for(settings)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    tps = [
        TopicPartition(t, p, 0) for t in (topics.events, topics.command_results) for p in range(3)
    ]
    consumer.assign(tps)
    records: list[SourceRecord] = []
    done: set[tuple[str, int]] = set()
    while len(done) < len(tps):
        for m in consumer.consume(num_messages=10_000, timeout=1.0):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    done.add((m.topic(), m.partition()))
                continue
            records.append(SourceRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value()))
    consumer.close()
    return records


def fresh_clone(settings: Settings, name: str) -> None:
    engine = get_engine(settings)
    with engine.begin() as conn:
        for ddl in create_shadow(engine, live="loops", shadow=name):
            conn.execute(text(ddl))


def bench_apply(settings: Settings, records: list[SourceRecord], batch: int) -> dict[str, Any]:
    fresh_clone(settings, "bench_apply")
    writer = ReadModelWriter(get_engine(settings), projection="bench_apply")
    topics = topics_for(settings)
    started = time.perf_counter()
    # As replay applies: batch n+1 is decoded while batch n is written.
    overlapped(
        (records[i : i + batch] for i in range(0, len(records), batch)),
        lambda chunk: plan_batch(chunk, topics),
        writer.apply,
    )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "records_per_s": len(records) / seconds}


def final_rows(settings: Settings, records: list[SourceRecord]) -> dict[str, list[tuple]]:
    """Exactly the rows the projection ends with, serialized as the writer sends them."""
    changes = plan_batch(records, topics_for(settings)).changes
    rows: dict[str, list[tuple]] = {}
    for change in merge_changes(changes, TABLES):
        spec = TABLES[change.table]
        row = tuple(change.values.get(c) for c in spec.columns)
        encoders = json_encoders(spec, spec.columns)
        rows.setdefault(change.table, []).append(_with_json(row, encoders))
    return rows


def bench_copy(settings: Settings, rows: dict[str, list[tuple]]) -> dict[str, Any]:
    fresh_clone(settings, "bench_copy")
    with psycopg.connect(settings.pg_conninfo) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            for table, table_rows in rows.items():
                columns = ", ".join(TABLES[table].columns)
                with cur.copy(f"copy bench_copy.{table} ({columns}) from stdin") as copy:
                    for row in table_rows:
                        copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": sum(len(r) for r in rows.values())}


def _projected(settings: Settings) -> int:
    with psycopg.connect(settings.pg_conninfo) as conn:
        row = conn.execute(
            "select (select count(*) from loops.event_log) "
            "+ (select count(*) from loops.command_results)"
        ).fetchone()
    return int(row[0]) if row else 0


def bench_runner(isolated: Isolated, records: int, log: Path) -> dict[str, Any]:
    """The faust runner from an empty database; the rate is timed from its first commit on."""
    settings = isolated.settings
    started = time.perf_counter()
    runner = start_runner(isolated, "--batch-size", "5000", log_path=log)
    try:
        wait_for(lambda: _projected(settings) > 0, timeout_s=120, what="the first batch")
        first_at, first_count = time.perf_counter(), _projected(settings)
        wait_for(caught_up(settings), timeout_s=300, what="the runner")
        done_at = time.perf_counter()
    finally:
        stop(runner)
    return {
        "startup_seconds": first_at - started,
        "seconds_after_first_batch": done_at - first_at,
        "records_per_s": (records - first_count) / (done_at - first_at),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()
    relax_gc()  # as the runner and the replay workers do
    from projections.sample import messages

    base = get_settings()
    slice_ = isolated_slice(base)
    isolated = next(slice_)
    settings = isolated.settings
    try:
        t0 = time.perf_counter()
        produced = produce(
            settings, messages(args.events, sessions=args.sessions), per_transaction=5000
        )
        produce_s = time.perf_counter() - t0
        print(f"produced {produced} records in {produce_s:.1f}s")
        records = read_all(settings)
        assert len(records) == produced, (len(records), produced)

        apply = bench_apply(settings, records, args.batch)
        print(f"apply: {apply['records_per_s']:,.0f} records/s")
        rows = final_rows(settings, records)
        copy = bench_copy(settings, rows)
        copy["records_per_s"] = len(records) / copy["seconds"]
        print(f"raw COPY of the same rows: {copy['records_per_s']:,.0f} records/s")

        runner = bench_runner(
            isolated, produced, Path("/tmp") / f"bench-runner-{uuid.uuid4().hex}.log"
        )
        print(f"faust runner end to end: {runner['records_per_s']:,.0f} records/s")

        replay = replay_into_shadow(settings)  # its defaults: 2 workers, 10k-record batches
        print(f"replay: {replay.events_per_s:,.0f} events/s, {replay.records_per_s:,.0f} records/s")

        result = {
            "machine": {"cpus": _cpus(), "python": platform.python_version()},
            "events": args.events,
            "records": produced,  # events + one command result per event
            "produce_seconds": produce_s,
            "apply": apply,
            "raw_copy": copy,
            "apply_vs_copy_slowdown": apply["seconds"] / copy["seconds"],
            "runner_end_to_end": runner,
            "runner_vs_copy_slowdown": copy["records_per_s"] / runner["records_per_s"],
            "replay": {
                "seconds": replay.seconds,
                "records_per_s": replay.records / replay.seconds,
                "events_per_s": replay.events / replay.seconds,
            },
            "targets": {"projection_within_x_of_copy": 3.0, "replay_events_per_s": 20_000},
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        slice_.close()


def _cpus() -> int:
    return int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0)


if __name__ == "__main__":
    main()
