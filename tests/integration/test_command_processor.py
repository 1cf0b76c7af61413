"""The command processor on the real broker: events, results, rejections, dead letters."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from confluent_kafka import Producer

from commands.bus import CommandBus
from commands.envelope import CommandResult
from events.envelope import EventEnvelope, utc_now
from events.kafka_log import partition_count, partition_for
from events.loops import (
    CheckpointFile,
    CheckpointSaved,
    DomainEvent,
    RunStopped,
    SessionCreated,
    SessionEnded,
)
from infra.settings import Settings
from tests.integration.kafka_helpers import (
    command,
    isolated_settings,
    read_events,
    read_topic,
    running_processor,
    wait_for_results,
)

FILES = [{"relative_file_name": "model.safetensors", "size_bytes": 10, "sha256": "a" * 64}]


def test_session_lifecycle_becomes_events_with_gap_free_sequences(settings: Settings) -> None:
    s = isolated_settings(settings)
    bus = CommandBus(s)
    sid = f"s{uuid.uuid4().hex[:8]}"
    commands = [
        command("CreateSession", sid, {"base_model": "tiny-llama"}),
        command("CreateRun", sid, {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 256}),
        command(
            "RecordCheckpoint",
            sid,
            {"run_id": "r1", "checkpoint_id": "c1", "name": "step-1", "kind": "weights",
             "files": FILES},
        ),
        command("EndSession", sid),
    ]  # fmt: skip
    with running_processor(s):
        bus.send_many(commands)
        results = wait_for_results(s, [c.command_id for c in commands])

    assert [results[c.command_id].status for c in commands] == ["accepted"] * 4
    events = [e for e in read_events(s) if e.aggregate_id == sid]
    assert [e.type for e in events] == [
        "SessionCreated",
        "RunCreated",
        "SamplerCreated",
        "CheckpointSaved",
        "RunStopped",
        "SamplerStopped",
        "SessionEnded",
    ]
    assert [e.sequence for e in events] == list(range(1, 8))
    assert events[3].payload["uri"] == "bt://loops:r1/weights/step-1"
    assert all(e.command_id and e.correlation_id for e in events)


def test_duplicate_command_id_returns_first_result_and_no_new_events(settings: Settings) -> None:
    s = isolated_settings(settings)
    bus = CommandBus(s)
    sid = f"s{uuid.uuid4().hex[:8]}"
    create = command("CreateSession", sid, {"base_model": "m"})
    with running_processor(s):
        bus.send(create)
        first = wait_for_results(s, [create.command_id])[create.command_id]
        bus.send(create)  # the same command_id again
        marker = command("EndSession", sid)
        bus.send(marker)
        wait_for_results(s, [marker.command_id])

    assert first.status == "accepted"
    types = [e.type for e in read_events(s) if e.aggregate_id == sid]
    assert types.count("SessionCreated") == 1


def test_bad_commands_are_rejected_or_dead_lettered_and_processing_goes_on(
    settings: Settings,
) -> None:
    s = isolated_settings(settings)
    raw = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
    topic = s.topic("commands")
    sid = f"s{uuid.uuid4().hex[:8]}"

    def send_raw(value: bytes, key: str = sid) -> None:
        raw.produce(topic, key=key.encode(), value=value)

    send_raw(b"\x00\xffgarbage")
    send_raw(json.dumps({"type": "CreateSession", "aggregate_id": sid}).encode())  # no id
    wrong_version = command("CreateSession", sid, {"base_model": "m"}, schema_version=99)
    unknown_type = command("LaunchRockets", sid)
    missing = command("EndSession", f"missing{uuid.uuid4().hex[:6]}")
    bad_field = command("CreateSession", sid, {"base_model": ""})
    good = command("CreateSession", sid, {"base_model": "m"})
    bad_run = command("CreateRun", sid, {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 0})
    for c in (wrong_version, unknown_type, bad_field, good, bad_run):
        send_raw(c.to_bytes())
    send_raw(missing.to_bytes(), key=missing.aggregate_id)
    raw.flush(10)

    ids = [c.command_id for c in (wrong_version, unknown_type, missing, bad_field, good, bad_run)]
    with running_processor(s):
        results = wait_for_results(s, ids)

    assert results[good.command_id].status == "accepted"
    expectations = {
        wrong_version.command_id: "schema_version",
        unknown_type.command_id: "type",
        missing.command_id: "aggregate_id",
        bad_field.command_id: "payload.base_model",
        bad_run.command_id: "payload.max_seq_len",
    }
    for command_id, field in expectations.items():
        result = results[command_id]
        assert result.status == "rejected"
        assert result.field == field, result
        assert result.reason
    assert "does not exist" in (results[missing.command_id].reason or "")

    dead = read_topic(s, "commands.dlq")
    assert [value for _, _, value, _ in dead] == [
        b"\x00\xffgarbage",
        json.dumps({"type": "CreateSession", "aggregate_id": sid}).encode(),
    ]
    errors = [dict(headers)["error"].decode() for _, _, _, headers in dead]
    assert errors[0].startswith("not valid JSON")
    assert errors[1].startswith("no command_id")


def test_command_on_the_wrong_partition_is_forwarded_to_its_owner(settings: Settings) -> None:
    """A producer with another partitioner must not split an aggregate across processors."""
    s = isolated_settings(settings)
    from events.kafka_log import partition_for

    sid = f"s{uuid.uuid4().hex[:8]}"
    owner = partition_for(sid.encode(), 3)
    wrong = (owner + 1) % 3
    raw = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
    create = command("CreateSession", sid, {"base_model": "m"})
    raw.produce(s.topic("commands"), key=sid.encode(), value=create.to_bytes(), partition=wrong)
    raw.flush(10)

    with running_processor(s):
        results = wait_for_results(s, [create.command_id])

    assert results[create.command_id].status == "accepted"
    partitions = {p for p, _, v, _ in read_topic(s, "events") if sid.encode() in (v or b"")}
    assert partitions == {owner}


def test_our_producers_partition_like_the_java_client(settings: Settings) -> None:
    s = isolated_settings(settings)
    creates = [
        command("CreateSession", f"s{i}-{uuid.uuid4().hex[:6]}", {"base_model": "m"})
        for i in range(60)
    ]
    with running_processor(s) as processor:
        CommandBus(s).send_many(creates)
        wait_for_results(s, [c.command_id for c in creates])
        forwarded = processor.totals.forwarded

    assert forwarded == 0


# --- no poison pill (issue 10, findings 1 and 2) -----------------------------------------------


def _envelope(event: DomainEvent, *, sid: str, sequence: int) -> EventEnvelope:
    return EventEnvelope(
        event_id=str(uuid.uuid4()),
        type=type(event).__name__,
        schema_version=event.schema_version,
        aggregate_type=event.aggregate_type,
        aggregate_id=sid,
        sequence=sequence,
        occurred_at=utc_now(),
        payload=event.model_dump(mode="json"),
    )


def _readable_results(s: Settings, command_ids: list[str]) -> dict[str, CommandResult]:
    """wait_for_results for topics that also hold garbage on purpose: unreadable ones skipped."""
    deadline = time.monotonic() + 60
    while True:
        results = {}
        for _, _, value, _ in read_topic(s, "command-results"):
            with contextlib.suppress(ValueError):
                result = CommandResult.model_validate_json(value or b"")
                results[result.command_id] = result
        if set(command_ids) <= results.keys() or time.monotonic() > deadline:
            return results
        time.sleep(0.3)


def _readable_events(s: Settings) -> list[EventEnvelope]:
    events = []
    for _, _, value, _ in read_topic(s, "events"):
        with contextlib.suppress(ValueError):
            events.append(EventEnvelope.from_bytes(value))
    return events


def test_unreadable_records_in_the_log_are_skipped_dead_lettered_once_and_commands_served(
    settings: Settings,
) -> None:
    """Finding 2: one undecodable record on the events or results topic stopped the processor
    at start-up, in the state rebuild, for good."""
    s = isolated_settings(settings)
    sid = f"s{uuid.uuid4().hex[:8]}"
    owner = partition_for(sid.encode(), partition_count(s, s.topic("events")))
    raw = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
    unknown_type = _envelope(SessionEnded(session_id=sid, reason="x"), sid=sid, sequence=1)
    unknown_type = unknown_type.model_copy(update={"type": "RocketsLaunched"})
    unknown_run = _envelope(
        RunStopped(run_id="ghost", session_id=sid, reason="x"), sid=sid, sequence=2
    )  # evolve: KeyError, no such run
    for topic, value in [
        ("events", b"\x00\xff not json"),
        ("events", unknown_type.to_bytes()),
        ("events", unknown_run.to_bytes()),
        ("command-results", b'{"command_id": 42}'),
    ]:
        raw.produce(s.topic(topic), key=sid.encode(), value=value, partition=owner)
    raw.flush(10)

    create = command("CreateSession", sid, {"base_model": "m"})
    with running_processor(s) as processor:
        CommandBus(s).send(create)
        results = _readable_results(s, [create.command_id])
        skipped = processor.skipped_records
    assert results[create.command_id].status == "accepted"
    assert skipped == 4
    # The skipped events' sequences are taken: the new event does not reuse 1 or 2.
    assert [e.sequence for e in _readable_events(s) if e.type == "SessionCreated"] == [3]

    dead = read_topic(s, "commands.dlq")
    sources = sorted(
        (dict(h)["source_topic"].decode(), int(dict(h)["source_offset"])) for *_, h in dead
    )
    assert sources == [
        (s.topic("command-results"), 0),
        (s.topic("events"), 0),
        (s.topic("events"), 1),
        (s.topic("events"), 2),
    ]
    assert all(dict(h)["error"] for *_, h in dead)

    # A restart skips them again but does not dead-letter them a second time.
    end = command("EndSession", sid)
    with running_processor(s) as processor:
        CommandBus(s).send(end)
        assert _readable_results(s, [end.command_id])[end.command_id].status == "accepted"
        assert processor.skipped_records == 4
    assert len(read_topic(s, "commands.dlq")) == 4


def test_command_whose_decision_raises_is_a_server_rejection_and_the_next_is_accepted(
    settings: Settings,
) -> None:
    """Finding 1's mechanism: decide raising (here a KeyError: a checkpoint of a run the session
    does not know, written to the log by another producer) used to kill the processor at the
    same offset on every restart. Now it is answered, and the partition goes on."""
    s = isolated_settings(settings)
    sid = f"s{uuid.uuid4().hex[:8]}"
    owner = partition_for(sid.encode(), partition_count(s, s.topic("events")))
    orphan = CheckpointSaved(
        checkpoint_id="orphan", run_id="ghost", session_id=sid, name="x",
        kind="sampler_weights", uri="bt://loops:ghost/sampler_weights/x",
        files=tuple(CheckpointFile.model_validate(f) for f in FILES), total_size_bytes=10,
    )  # fmt: skip
    raw = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
    for sequence, event in enumerate([SessionCreated(session_id=sid, base_model="m"), orphan], 1):
        raw.produce(
            s.topic("events"),
            key=sid.encode(),
            value=_envelope(event, sid=sid, sequence=sequence).to_bytes(),
            partition=owner,
        )
    raw.flush(10)

    promote = command("PromoteCheckpoint", sid, {"checkpoint_id": "orphan", "environment": "prod"})
    after = command("CreateRun", sid, {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 8})
    with running_processor(s):
        CommandBus(s).send_many([promote, after])  # one partition, in this order
        results = wait_for_results(s, [promote.command_id, after.command_id])

    failed = results[promote.command_id]
    assert (failed.status, failed.category) == ("rejected", "server")
    assert (failed.reason or "").startswith("internal error: KeyError")
    assert results[after.command_id].status == "accepted"
    assert [e.sequence for e in read_events(s) if e.type == "RunCreated"] == [3]
