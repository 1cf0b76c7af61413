"""What must hold after every fault, read from the isolated topics and read models themselves.

- No accepted command is lost: every request id the API answered 202 for has a result record.
- None is doubled: one result record per command id, one copy of each event (event id), every
  aggregate's sequences gap-free from 1 with no repeats, and every event of a command listed in
  that command's one result (a command handled twice would write its events again, under new
  ids and sequences, that its surviving result does not name).
- Replay equals live: the read models rebuilt from the log into a shadow schema equal the live
  ones table by table (row counts and content checksums), once the live projection caught up;
  and the live read model equals the log itself (`projections.check`: per aggregate, the events
  applied vs those on the topic), which a record skipped by both live and replay would fail.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from api.submit import request_id_of
from commands.envelope import CommandResult
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope
from infra.settings import Settings
from projections.check import check_against_log
from projections.db import get_engine
from projections.replay import compare, replay_into_shadow
from tests.integration.kafka_helpers import read_topic
from tests.integration.projection_support import caught_up, end_offsets


@dataclass(frozen=True)
class LedgerReport:
    results: int
    events: int
    replayed_events: int
    tables: int
    aggregates: int  # checked against the log itself


def check_exactly_once(settings: Settings, accepted: Iterable[str]) -> tuple[int, int]:
    """Assert nothing accepted was lost or doubled; returns (results, events) on the topics."""
    results = [
        CommandResult.model_validate_json(value)
        for _, _, value, _ in read_topic(settings, "command-results")
    ]
    # The API's command ids are the request ids within their workspace; compare request ids.
    per_command = Counter(request_id_of(r.workspace_id or DEFAULT_WORKSPACE, r.command_id)
                          for r in results)  # fmt: skip
    doubled = {cid: n for cid, n in per_command.items() if n > 1}
    assert not doubled, f"commands with more than one result: {list(doubled.items())[:5]}"
    lost = sorted(set(accepted) - per_command.keys())
    assert not lost, f"{len(lost)} accepted requests have no result, e.g. {lost[:3]}"

    events = [EventEnvelope.from_bytes(v) for _, _, v, _ in read_topic(settings, "events")]
    copies = Counter(e.event_id for e in events)
    assert all(n == 1 for n in copies.values()), "an event was written twice"
    sequences: dict[str, list[int]] = defaultdict(list)
    for event in events:
        sequences[event.aggregate_id].append(event.sequence)
    broken = {
        aggregate: seqs
        for aggregate, seqs in sequences.items()
        if sorted(seqs) != list(range(1, len(seqs) + 1))
    }
    assert not broken, f"sequences with gaps or repeats: {list(broken.items())[:3]}"
    listed = {r.command_id: {str(ref.event_id) for ref in r.events} for r in results}
    unlisted = [
        (event.command_id, event.type)
        for event in events
        if event.command_id and str(event.event_id) not in listed.get(event.command_id, set())
    ]
    assert not unlisted, f"events their command's result does not list: {unlisted[:5]}"
    return len(results), len(events)


def wait_until_caught_up(settings: Settings, *, timeout_s: float = 90.0) -> None:
    """The live projection has applied everything, and nothing new arrived for a moment (a
    worker may still be finishing a sync the loop did not wait for)."""
    topics = [settings.topic("events"), settings.topic("command-results")]
    check = caught_up(settings)
    deadline = time.monotonic() + timeout_s
    previous: dict[tuple[str, int], int] | None = None
    while time.monotonic() < deadline:
        ends = end_offsets(settings, topics)
        if ends == previous and check():
            return
        previous = ends
        time.sleep(1.0)
    raise AssertionError(f"the isolated projection did not catch up in {timeout_s}s")


def check_replay_equals_live(settings: Settings) -> tuple[int, int]:
    """Rebuild `loops` from the log into its shadow and compare; returns (events, tables)."""
    report = replay_into_shadow(settings, projection="loops", workers=1, timeout_s=120)
    comparisons = compare(get_engine(settings), live="loops", shadow="loops__shadow")
    differing = [c for c in comparisons if not c.matches]
    assert not differing, f"replay differs from live: {differing}"
    return report.events, len(comparisons)


def check_live_equals_log(settings: Settings) -> int:
    """The live `loops` event_log against the events topic; returns the aggregates checked."""
    check = check_against_log(settings, projection="loops", timeout_s=120)
    assert check.matches, f"the read model differs from the log: {check.mismatches[:5]}"
    return check.aggregates


def check_ledger(settings: Settings, accepted: Iterable[str]) -> LedgerReport:
    results, events = check_exactly_once(settings, accepted)
    wait_until_caught_up(settings)
    aggregates = check_live_equals_log(settings)
    replayed, tables = check_replay_equals_live(settings)
    return LedgerReport(
        results=results,
        events=events,
        replayed_events=replayed,
        tables=tables,
        aggregates=aggregates,
    )
