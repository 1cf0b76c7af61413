"""The command processor on the real broker: events, results, rejections, dead letters."""

from __future__ import annotations

import json
import uuid

from confluent_kafka import Producer

from commands.bus import CommandBus
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
