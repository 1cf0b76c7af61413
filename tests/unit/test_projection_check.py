"""`replay --check` against the log itself: per-aggregate tallies and their comparison (pure)."""

from __future__ import annotations

from events.envelope import DEFAULT_WORKSPACE, EventEnvelope
from events.loops import SessionCreated, SessionEnded
from projections.check import (
    AggregateTally,
    LogTally,
    compare_tallies,
    event_checksum,
    log_entry,
)
from projections.pipeline import SourceRecord
from tests.unit.test_projection_loops import envelope


def record(value: bytes | None, offset: int, *, key: bytes | None = b"ses-1") -> SourceRecord:
    return SourceRecord("p.events", 0, offset, key, value)


def created(aggregate: str = "ses-1") -> bytes:
    return envelope(SessionCreated(session_id=aggregate, base_model="m"), 1, aggregate).to_bytes()


def ended(aggregate: str = "ses-1", reason: str = "done") -> bytes:
    return envelope(SessionEnded(session_id=aggregate, reason=reason), 2, aggregate).to_bytes()


def tally(*records: SourceRecord) -> dict[str, AggregateTally]:
    log = LogTally()
    for r in records:
        log.add(r)
    return log.tallies()


def test_the_log_tally_counts_events_per_aggregate_with_last_sequence_and_checksum() -> None:
    tallies = tally(record(created(), 0), record(ended(), 1), record(created("ses-2"), 2))
    assert tallies["ses-1"] == AggregateTally(
        events=2,
        last_sequence=2,
        checksum=event_checksum("evt-1", 1) + event_checksum("evt-2", 2),
    )
    assert tallies["ses-2"].events == 1


def test_the_same_event_written_twice_counts_once() -> None:
    assert tally(record(created(), 0), record(created(), 1))["ses-1"].events == 1


def test_the_checksum_ignores_order_but_not_identity() -> None:
    forward = tally(record(created(), 0), record(ended(), 1))
    backward = tally(record(ended(), 0), record(created(), 1))
    assert forward == backward
    assert event_checksum("evt-1", 1) != event_checksum("evt-1", 2)
    assert event_checksum("evt-1", 1) < 2**60


def test_a_non_json_record_belongs_to_the_aggregate_its_key_names() -> None:
    assert log_entry(record(b"\x00 not json", 5)) == ("ses-1", "p.events[0]@5", None)
    assert log_entry(record(None, 6, key=None)) == (
        "<no key at p.events[0]@6>",
        "p.events[0]@6",
        None,
    )


def test_an_event_the_read_model_lacks_is_a_mismatch_naming_its_aggregate() -> None:
    log = tally(record(created(), 0), record(ended(reason="a\x00b"), 1), record(created("s2"), 2))
    # The read model applied SessionCreated of ses-1 and all of s2, not the NUL SessionEnded.
    read_model = tally(record(created(), 0), record(created("s2"), 2))
    (mismatch,) = compare_tallies(log, read_model)
    assert mismatch.aggregate_id == "ses-1"
    assert mismatch.missing == 1
    assert mismatch.log is not None and mismatch.log.last_sequence == 2


def test_an_undecodable_record_is_a_mismatch_of_its_keyed_aggregate() -> None:
    log = tally(record(created(), 0), record(b"garbage", 1))
    read_model = tally(record(created(), 0))
    assert [m.aggregate_id for m in compare_tallies(log, read_model)] == ["ses-1"]


def test_the_same_count_of_different_events_is_still_a_mismatch() -> None:
    log = {"ses-1": AggregateTally(2, 2, event_checksum("a", 1) + event_checksum("b", 2))}
    read_model = {"ses-1": AggregateTally(2, 2, event_checksum("a", 1) + event_checksum("c", 2))}
    (mismatch,) = compare_tallies(log, read_model)
    assert mismatch.missing == 0


def test_a_read_model_equal_to_the_log_has_no_mismatch() -> None:
    records = [record(created(), 0), record(ended(), 1)]
    assert compare_tallies(tally(*records), tally(*records)) == []
    # Events only the read model has are a mismatch too.
    (extra,) = compare_tallies({}, tally(*records))
    assert extra.missing == -2


def test_a_workspace_check_tallies_that_workspaces_events_only() -> None:
    """`projections check --workspace`: events of other workspaces, and records that name none
    (not an envelope), are left out; events from before tenancy are the default workspace's."""
    theirs = EventEnvelope.from_bytes(created("ses-2"))
    theirs = theirs.model_copy(update={"workspace_id": "team-a"})
    log = LogTally(workspace="team-a")
    for r in (record(created(), 0), record(theirs.to_bytes(), 1, key=b"ses-2"), record(b"x", 2)):
        log.add(r)
    assert set(log.tallies()) == {"ses-2"} and log.records == 3
    default = LogTally(workspace=DEFAULT_WORKSPACE)
    default.add(record(created(), 0))
    assert set(default.tallies()) == {"ses-1"}
