"""handle_command: raw bytes in, one outcome out, with an in-memory state (no Kafka)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from typing import Any

from commands.envelope import CommandEnvelope, CommandResult
from commands.handling import Accepted, Duplicate, Refused, Undeliverable, handle_command
from commands.registry import AggregateSpec

NOW = datetime(2026, 11, 27, tzinfo=UTC)


class InMemoryAggregates:
    """The unit-test stand-in for the processor's per-partition state."""

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}
        self.results: dict[str, CommandResult] = {}
        self._ids = (f"e{i}" for i in itertools.count())

    def handle(self, raw: bytes, key: str | None = "s1") -> Any:
        outcome = handle_command(
            raw,
            key=key.encode() if key else None,
            load_state=self._load,
            previous_result=self.results.get,
            now=NOW,
            new_event_id=lambda: next(self._ids),
        )
        if isinstance(outcome, Accepted):
            self.states[outcome.result.aggregate_id or ""] = outcome.state
        if isinstance(outcome, Accepted | Refused):
            self.results[outcome.result.command_id] = outcome.result
        return outcome

    def _load(self, spec: AggregateSpec, aggregate_id: str) -> Any:
        return self.states.get(aggregate_id) or spec.initial_state(aggregate_id)


def cmd(type_: str, payload: dict, command_id: str = "c1", **extra: Any) -> bytes:
    return CommandEnvelope(
        command_id=command_id, type=type_, aggregate_id="s1", payload=payload, **extra
    ).to_bytes()


def test_accepted_command_yields_envelopes_with_next_sequences() -> None:
    bus = InMemoryAggregates()
    bus.handle(cmd("CreateSession", {"base_model": "m"}, "c1", correlation_id="corr"))
    outcome = bus.handle(
        cmd("CreateRun", {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 8}, "c2")
    )
    assert isinstance(outcome, Accepted)
    assert [(e.type, e.sequence) for e in outcome.events] == [
        ("RunCreated", 2),
        ("SamplerCreated", 3),
    ]
    event = outcome.events[0]
    assert event.command_id == "c2" and event.causation_id == "c2"
    assert event.aggregate_type == "session" and event.occurred_at == NOW
    assert [ref.sequence for ref in outcome.result.events] == [2, 3]


def test_correlation_id_flows_from_command_to_events() -> None:
    outcome = InMemoryAggregates().handle(
        cmd("CreateSession", {"base_model": "m"}, correlation_id="conversation-7")
    )
    assert outcome.events[0].correlation_id == "conversation-7"


def test_same_command_id_is_a_duplicate_with_the_first_result() -> None:
    bus = InMemoryAggregates()
    first = bus.handle(cmd("CreateSession", {"base_model": "m"}))
    again = bus.handle(cmd("CreateSession", {"base_model": "other"}))
    assert isinstance(again, Duplicate)
    assert again.result == first.result


def test_rejected_command_is_remembered_too() -> None:
    bus = InMemoryAggregates()
    first = bus.handle(cmd("EndSession", {}))
    assert isinstance(first, Refused)
    assert isinstance(bus.handle(cmd("EndSession", {})), Duplicate)


def test_garbage_is_undeliverable() -> None:
    assert isinstance(InMemoryAggregates().handle(b"\x00\x01"), Undeliverable)
    assert isinstance(InMemoryAggregates().handle(b"[1, 2]"), Undeliverable)
    outcome = InMemoryAggregates().handle(json.dumps({"type": "CreateSession"}).encode())
    assert isinstance(outcome, Undeliverable) and "command_id" in outcome.reason


def test_unknown_field_in_envelope_is_named() -> None:
    raw = json.dumps(
        {"command_id": "c1", "type": "CreateSession", "aggregate_id": "s1", "colour": "red"}
    ).encode()
    outcome = InMemoryAggregates().handle(raw)
    assert isinstance(outcome, Refused)
    assert outcome.result.field == "colour"
    assert "unknown field colour" in (outcome.result.reason or "")


def test_missing_payload_field_is_named() -> None:
    outcome = InMemoryAggregates().handle(cmd("CreateSession", {}))
    assert isinstance(outcome, Refused)
    assert outcome.result.field == "payload.base_model"


def test_key_must_match_aggregate_id() -> None:
    outcome = InMemoryAggregates().handle(cmd("CreateSession", {"base_model": "m"}), key="s2")
    assert isinstance(outcome, Refused) and outcome.result.field == "aggregate_id"
    unkeyed = InMemoryAggregates().handle(cmd("CreateSession", {"base_model": "m"}), key=None)
    assert isinstance(unkeyed, Refused)


def test_future_schema_version_is_refused_naming_the_version() -> None:
    outcome = InMemoryAggregates().handle(
        cmd("CreateSession", {"base_model": "m"}, schema_version=2)
    )
    assert isinstance(outcome, Refused)
    assert outcome.result.field == "schema_version"
    assert "schema_version 2" in (outcome.result.reason or "")
