"""Replay on the real stack: a rebuilt shadow equals the live projection, and swaps in."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from infra.settings import Settings
from projections.check import check_against_log
from projections.db import get_engine
from projections.health import count_failures
from projections.replay import compare, replay_into_shadow, swap, tables_of
from projections.sample import messages
from projections.store import positions_of
from tests.integration.projection_support import (
    Isolated,
    caught_up,
    isolated_slice,
    produce,
    start_runner,
    stop,
    wait_for,
)


@pytest.fixture
def isolated(settings: Settings) -> Iterator[Isolated]:
    yield from isolated_slice(settings)


def _run_until_caught_up(isolated: Isolated, log: Path) -> None:
    runner = start_runner(isolated, log_path=log)
    try:
        wait_for(caught_up(isolated.settings), timeout_s=90, what="the live runner")
    finally:
        stop(runner)


def _index_names(isolated: Isolated, schema: str) -> set[str]:
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        rows = conn.execute("select indexname from pg_indexes where schemaname = %s", (schema,))
        return {name for (name,) in rows}


def test_replay_equals_the_live_projection_and_swaps_in(isolated: Isolated, tmp_path: Path) -> None:
    engine = get_engine(isolated.settings)
    produce(isolated.settings, messages(4000, sessions=40))
    _run_until_caught_up(isolated, tmp_path / "runner.log")
    live_indexes = _index_names(isolated, "loops")
    # A clean log gives a clean check: every event of every aggregate is in the read model.
    check = check_against_log(isolated.settings)
    assert check.matches, check.mismatches[:5]
    assert (check.records, check.aggregates) == (4000, 80)  # 40 sessions and their samplers
    assert count_failures(engine, "loops") == 0

    report = replay_into_shadow(isolated.settings, batch_size=1500)
    assert report.events == 4000 and report.records == 8000

    comparisons = compare(engine, live="loops", shadow="loops__shadow")
    assert {c.table for c in comparisons} == set(tables_of(engine, "loops"))
    assert all(c.matches for c in comparisons), comparisons
    # Every read model has rows (but the access and serving tables: this log holds sessions
    # only); the failures table has none, as the log is clean.
    unfilled = {"projection_failures", "workspaces", "api_keys", "models", "deployments",
                "replicas", "async_requests"}  # fmt: skip
    assert all(c.live_rows for c in comparisons if c.table not in unfilled), comparisons
    # The live runner and the replay stopped at the same offsets.
    assert positions_of(engine, "loops__shadow") == positions_of(engine, "loops")
    # A structural clone, index names included (later migrations can name them).
    assert _index_names(isolated, "loops__shadow") == live_indexes

    swap(engine, live="loops", shadow="loops__shadow")
    assert tables_of(engine, "loops__shadow") == []
    assert _index_names(isolated, "loops") == live_indexes
    assert check_against_log(isolated.settings).matches  # the swapped-in schema too

    # The swapped-in schema is live: the runner resumes from its positions and keeps going.
    produce(isolated.settings, messages(500, sessions=5, seed=1))
    _run_until_caught_up(isolated, tmp_path / "runner.log")
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        (count,) = conn.execute("select count(*) from loops.event_log").fetchone()  # type: ignore[misc]
    assert count == 4500


def test_a_diverged_live_projection_shows_up_in_the_comparison(
    isolated: Isolated, tmp_path: Path
) -> None:
    engine = get_engine(isolated.settings)
    produce(isolated.settings, messages(300, sessions=3))
    _run_until_caught_up(isolated, tmp_path / "runner.log")
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        conn.execute("update loops.sessions set name = 'tampered' where session_id = 'ses-0000001'")

    replay_into_shadow(isolated.settings)
    mismatched = {
        c.table for c in compare(engine, live="loops", shadow="loops__shadow") if not c.matches
    }
    assert mismatched == {"sessions"}


def test_the_check_against_the_log_finds_an_event_missing_from_the_read_model(
    isolated: Isolated, tmp_path: Path
) -> None:
    produce(isolated.settings, messages(300, sessions=3))
    _run_until_caught_up(isolated, tmp_path / "runner.log")
    with psycopg.connect(isolated.settings.pg_conninfo) as conn:
        conn.execute(
            "delete from loops.event_log where aggregate_id = 'ses-0000001' and sequence = 3"
        )
    (mismatch,) = check_against_log(isolated.settings).mismatches
    assert (mismatch.aggregate_id, mismatch.missing) == ("ses-0000001", 1)


def test_replay_from_a_timestamp_only_rebuilds_the_later_events(isolated: Isolated) -> None:
    # Kafka timestamps are the produce time, so split the log in two produce calls in time.
    produce(isolated.settings, messages(200, sessions=2))
    cut = psycopg.connect(isolated.settings.pg_conninfo).execute("select now()").fetchone()[0]  # type: ignore[index]
    produce(isolated.settings, messages(100, sessions=1, seed=7))

    report = replay_into_shadow(isolated.settings, from_time=cut - timedelta(milliseconds=1))
    assert report.events == 100
