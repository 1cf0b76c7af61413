"""Batch planning, merging and SQL generation of the projections (pure, no services)."""

from __future__ import annotations

import json

from events.envelope import EventEnvelope
from events.loops import SessionCreated, SessionEnded
from projections.loops import TABLES
from projections.pipeline import ProjectionTopics, SourceRecord, dead_letter_headers, plan_batch
from projections.rows import RowChange, group_for_write, merge_changes
from projections.store import checked_identifier, create_stage_sql, write_sql
from tests.unit.test_projection_loops import envelope

TOPICS = ProjectionTopics(events="p.events", command_results="p.command-results")


def record(value: bytes | None, offset: int, partition: int = 0) -> SourceRecord:
    return SourceRecord("p.events", partition, offset, b"ses-1", value)


def created(sequence: int = 1) -> EventEnvelope:
    return envelope(SessionCreated(session_id="ses-1", base_model="m"), sequence)


def test_a_valid_event_yields_its_event_log_row_and_entity_rows() -> None:
    batch = plan_batch([record(created().to_bytes(), 10)], TOPICS)
    assert [c.table for c in batch.changes] == ["event_log", "sessions"]
    assert batch.next_offsets == {("p.events", 0): 11}
    assert not batch.dead_letters


def test_garbage_bytes_are_a_dead_letter_not_an_exception() -> None:
    batch = plan_batch([record(b"\x00\xffnot json", 3)], TOPICS)
    (letter,) = batch.dead_letters
    assert letter.error_type == "invalid_envelope"
    # The position still moves past it: the projection keeps going.
    assert batch.next_offsets == {("p.events", 0): 4}


def test_unknown_event_type_is_a_dead_letter() -> None:
    bad = created().model_copy(update={"type": "SessionTeleported"})
    (letter,) = plan_batch([record(bad.to_bytes(), 0)], TOPICS).dead_letters
    assert letter.error_type == "unknown_event_type" and "SessionTeleported" in letter.reason


def test_newer_schema_version_is_a_dead_letter() -> None:
    bad = created().model_copy(update={"schema_version": 99})
    (letter,) = plan_batch([record(bad.to_bytes(), 0)], TOPICS).dead_letters
    assert letter.error_type == "unsupported_schema_version"


def test_payload_that_does_not_match_its_type_is_a_dead_letter() -> None:
    bad = created().model_copy(update={"payload": {"session_id": "ses-1"}})
    (letter,) = plan_batch([record(bad.to_bytes(), 0)], TOPICS).dead_letters
    assert letter.error_type == "invalid_payload" and "base_model" in letter.reason


def test_records_below_the_stored_position_are_skipped() -> None:
    records = [record(created().to_bytes(), 4), record(created(2).to_bytes(), 5)]
    batch = plan_batch(records, TOPICS, positions={("p.events", 0): 5})
    assert [item.record.offset for item in batch.projected] == [5]


def test_a_tombstone_on_command_results_is_ignored_but_consumed() -> None:
    tombstone = SourceRecord("p.command-results", 1, 7, b"cmd", None)
    batch = plan_batch([tombstone], TOPICS)
    assert len(batch) == 0 and batch.next_offsets == {("p.command-results", 1): 8}


def test_dead_letter_headers_carry_reason_and_source() -> None:
    (letter,) = plan_batch([record(b"junk", 3, partition=2)], TOPICS).dead_letters
    headers = dict(dead_letter_headers(letter, projection="loops"))
    assert headers["dlq.error_type"] == b"invalid_envelope"
    assert headers["dlq.source_partition"] == b"2" and headers["dlq.source_offset"] == b"3"
    assert headers["dlq.reason"]


def test_merge_folds_a_batch_into_one_change_per_row() -> None:
    ended = envelope(SessionEnded(session_id="ses-1", reason="done"), 2)
    batch = plan_batch([record(created().to_bytes(), 0), record(ended.to_bytes(), 1)], TOPICS)
    merged = [c for c in merge_changes(batch.changes, TABLES) if c.table == "sessions"]
    (session,) = merged
    assert session.creates and session.version == 2
    assert session.values["status"] == "ended" and session.values["base_model"] == "m"


def test_merge_ignores_an_older_change_replayed_inside_the_batch() -> None:
    newer = RowChange("sessions", ("s",), 5, {"session_id": "s", "status": "ended"})
    older = RowChange("sessions", ("s",), 3, {"session_id": "s", "status": "active"})
    (merged,) = merge_changes([newer, older], TABLES)
    assert merged.values["status"] == "ended" and merged.version == 5


def test_insert_only_tables_keep_the_first_fact() -> None:
    first = RowChange("command_results", ("c",), 0, {"command_id": "c", "status": "accepted"})
    again = RowChange("command_results", ("c",), 0, {"command_id": "c", "status": "rejected"})
    (merged,) = merge_changes([first, again], TABLES)
    assert merged.values["status"] == "accepted"


def test_groups_put_whole_rows_before_partial_updates() -> None:
    update = RowChange("runs", ("r",), 4, {"run_id": "r", "status": "stopped"}, creates=False)
    insert = RowChange("runs", ("q",), 2, {"run_id": "q", "status": "active"}, creates=True)
    groups = list(group_for_write([update, insert], TABLES))
    assert [creates for _, creates, _ in groups] == [True, False]


def test_upserts_are_version_guarded() -> None:
    spec = TABLES["sessions"]
    upsert = write_sql("loops", spec, spec.columns, creates=True)
    assert "on conflict (session_id) do update" in upsert
    assert "where sessions.version < excluded.version" in upsert
    update = write_sql("loops", spec, ("session_id", "status", "version"), creates=False)
    assert update.startswith("update loops.sessions as t") and "t.version < s.version" in update


def test_insert_only_tables_do_nothing_on_conflict() -> None:
    spec = TABLES["event_log"]
    assert write_sql("s", spec, spec.columns, creates=True).endswith("on conflict do nothing")


def test_stage_tables_are_typed_by_the_target_table() -> None:
    sql = create_stage_sql("loops__shadow", "runs", ("run_id", "status"))
    assert "from loops__shadow.runs with no data" in sql and "on commit delete rows" in sql


def test_schema_names_must_be_plain_identifiers() -> None:
    assert checked_identifier("loops__shadow") == "loops__shadow"
    for bad in ("Loops", "loops; drop table x", "1loops", ""):
        try:
            checked_identifier(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_sample_history_is_valid_and_gap_free() -> None:
    from projections.sample import envelopes

    sequences: dict[str, list[int]] = {}
    for env, _ in envelopes(500, sessions=5):
        sequences.setdefault(env.aggregate_id, []).append(env.sequence)
        assert json.loads(env.to_bytes())["type"] == env.type
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in sequences.values())


# --- the fast decode path, JSON encoders, overlap, replay shares ----------------------------


def test_fast_path_gives_the_same_changes_as_the_checked_path() -> None:
    from projections.pipeline import _project_event_record, _project_event_record_checked
    from projections.sample import messages

    events = [m for m in messages(300, sessions=10) if m.topic == "events"]
    for i, message in enumerate(events):
        rec = SourceRecord("p.events", 0, i, message.key, message.value)
        assert _project_event_record(rec) == _project_event_record_checked(rec)


def test_event_log_keeps_the_wire_payload_on_the_fast_path() -> None:
    # `project` absent on the wire: the typed model defaults it, the audit row must not.
    wire = json.loads(created().to_bytes())
    wire["payload"] = {"session_id": "ses-1", "base_model": "m"}
    batch = plan_batch([record(json.dumps(wire).encode(), 0)], TOPICS)
    log_row = next(c for c in batch.changes if c.table == "event_log")
    assert log_row.values["payload"] == {"session_id": "ses-1", "base_model": "m"}


def test_wrong_aggregate_type_is_still_a_dead_letter() -> None:
    bad = created().model_copy(update={"aggregate_type": "run"})
    (letter,) = plan_batch([record(bad.to_bytes(), 0)], TOPICS).dead_letters
    assert letter.error_type == "wrong_aggregate_type"


def test_invalid_envelope_field_is_still_an_invalid_envelope() -> None:
    wire = json.loads(created().to_bytes())
    wire["sequence"] = 0  # ge=1
    (letter,) = plan_batch([record(json.dumps(wire).encode(), 0)], TOPICS).dead_letters
    assert letter.error_type == "invalid_envelope" and "sequence" in letter.reason


def test_json_columns_keep_their_text_and_jsonb_columns_any_equal_text() -> None:
    from projections.store import _with_json, json_encoders

    spec = TABLES["command_results"]
    encoders = json_encoders(spec, ("command_id", "events", "output"))
    row = _with_json(("c", [{"a": 1}], {"loss": 0.5, "big": 2**70}), encoders)
    assert row[0] == "c" and json.loads(row[1]) == [{"a": 1}]
    assert row[2] == '{"loss":0.5,"big":1180591620717411303424}'
    assert _with_json(("c", None, None), encoders) == ("c", None, None)


def test_overlapped_applies_in_order_and_raises_the_first_failure() -> None:
    import pytest

    from projections.pipeline import overlapped

    applied: list[int] = []
    overlapped(range(5), lambda i: i * 10, applied.append)
    assert applied == [0, 10, 20, 30, 40]

    def fail_on_20(value: int) -> None:
        if value == 20:
            raise RuntimeError("refused")
        applied.append(value)

    applied.clear()
    with pytest.raises(RuntimeError, match="refused"):
        overlapped(range(5), lambda i: i * 10, fail_on_20)
    assert applied == [0, 10]


def test_replay_shares_whole_partitions_evenly() -> None:
    from projections.replay import balanced_shares

    tps = [("e", 0), ("e", 1), ("e", 2), ("r", 0), ("r", 1), ("r", 2)]
    ends = {("e", 0): 40, ("e", 1): 30, ("e", 2): 30, ("r", 0): 40, ("r", 1): 30, ("r", 2): 30}
    shares = balanced_shares(tps, dict.fromkeys(tps, 0), ends, 2)
    assert sorted(tp for share in shares for tp in share) == sorted(tps)
    assert [sum(ends[tp] for tp in share) for share in shares] == [100, 100]
