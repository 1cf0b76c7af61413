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
    fields = {"aggregate_id": "s1", **extra}
    return CommandEnvelope(command_id=command_id, type=type_, payload=payload, **fields).to_bytes()


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


# --- no poison pill: whatever one command does, it gets an answer and the next one is served ---

SHA = "0" * 64


def checkpoint_command(command_id: str, **payload: Any) -> bytes:
    return cmd(
        "RecordCheckpoint",
        {
            "run_id": "r1",
            "checkpoint_id": command_id,
            "name": command_id,
            "kind": "weights",
            "files": [{"relative_file_name": "a", "size_bytes": 1, "sha256": SHA}],
            **payload,
        },
        command_id,
    )


def session_with_a_run() -> InMemoryAggregates:
    bus = InMemoryAggregates()
    bus.handle(cmd("CreateSession", {"base_model": "m"}, "c1"))
    bus.handle(cmd("CreateRun", {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 8}, "c2"))
    return bus


def test_exception_in_decide_is_a_server_rejection_and_the_next_command_is_served() -> None:
    # Finding 1's mechanism: a datetime overflow in RecordCheckpoint (expires_at = now + ttl) used
    # to escape handle_command and kill the processor at the same offset on every restart. The
    # clock at datetime's end makes it overflow whatever maximum the TTL has.
    bus = session_with_a_run()
    version = bus.states["s1"].version
    outcome = handle_command(
        checkpoint_command("k1", ttl_seconds=60),
        key=b"s1",
        load_state=bus._load,
        previous_result=bus.results.get,
        now=datetime.max.replace(tzinfo=UTC),
        new_event_id=lambda: "e-late",
    )
    assert isinstance(outcome, Refused)
    assert outcome.result.status == "rejected" and outcome.result.category == "server"
    assert (outcome.result.reason or "").startswith("internal error: OverflowError: ")
    assert bus.states["s1"].version == version  # nothing folded
    assert isinstance(bus.handle(checkpoint_command("k2", ttl_seconds=60)), Accepted)


def test_exception_while_folding_state_is_a_server_rejection() -> None:
    # A state the aggregate cannot work with (e.g. rebuilt around a skipped event): decide or
    # evolve raises a plain bug-type exception, which must still become an answer.
    bus = session_with_a_run()
    broken = bus.states["s1"]
    bus.states["s1"] = type(broken)(**{**vars(broken), "runs": {"r1": "not a run"}})  # type: ignore[arg-type]
    outcome = bus.handle(checkpoint_command("k1"))
    assert isinstance(outcome, Refused) and outcome.result.category == "server"
    assert "AttributeError" in (outcome.result.reason or "")


def test_rule_and_validation_rejections_are_the_users() -> None:
    bus = InMemoryAggregates()
    assert bus.handle(cmd("EndSession", {}, "c1")).result.category == "user"
    assert bus.handle(cmd("CreateSession", {}, "c2")).result.category == "user"


def test_lone_surrogate_command_id_is_undeliverable_not_a_crash() -> None:
    # Before: refusing it built a CommandResult with that id, which pydantic refused: it raised.
    raw = b'{"command_id": "c\\ud800", "type": "CreateSession", "aggregate_id": "s1"}'
    assert isinstance(InMemoryAggregates().handle(raw), Undeliverable)


def test_lone_surrogate_in_echoed_ids_is_refused_without_echoing_them() -> None:
    raw = b'{"command_id": "c1", "type": "Create\\ud800", "aggregate_id": "s\\udfff"}'
    outcome = InMemoryAggregates().handle(raw)
    assert isinstance(outcome, Refused) and outcome.result.category == "user"
    assert outcome.result.aggregate_id is None and outcome.result.command_type is None
    outcome.result.to_bytes()  # writable


def test_deeply_nested_json_is_undeliverable() -> None:
    # json.loads raises RecursionError (not a ValueError) past ~1000 levels.
    assert isinstance(InMemoryAggregates().handle(b"[" * 100_000), Undeliverable)
    nested = b'{"command_id": "c1", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert isinstance(InMemoryAggregates().handle(nested), Undeliverable)


def test_reason_quoting_a_huge_input_is_cut_to_a_readable_length() -> None:
    outcome = InMemoryAggregates().handle(cmd("X" * 500_000 + "\x00", {}))
    assert isinstance(outcome, Refused) and outcome.result.field == "type"
    reason = outcome.result.reason or ""
    assert len(reason) <= 1000 and "\x00" not in reason


def test_command_id_too_long_to_key_a_result_is_undeliverable() -> None:
    raw = json.dumps({"command_id": "c" * 5000, "type": "EndSession", "aggregate_id": "s1"})
    assert isinstance(InMemoryAggregates().handle(raw.encode()), Undeliverable)


def test_events_over_the_record_limit_are_refused_not_produced() -> None:
    outcome = handle_command(
        cmd("CreateSession", {"base_model": "m"}),
        key=b"s1",
        load_state=InMemoryAggregates()._load,
        previous_result=lambda _: None,
        now=NOW,
        new_event_id=lambda: "e1",
        max_record_bytes=100,
    )
    assert isinstance(outcome, Refused) and outcome.result.category == "user"
    assert "record limit" in (outcome.result.reason or "")


def test_accepted_carries_the_bytes_it_folded() -> None:
    outcome = InMemoryAggregates().handle(cmd("CreateSession", {"base_model": "m"}))
    assert isinstance(outcome, Accepted)
    assert [e.to_bytes() for e in outcome.events] == list(outcome.event_bytes)


# --- tenancy -------------------------------------------------------------------------------------


def _tenant_handle(raw: bytes, *, known: set[str], owners: dict[str, str], key: str = "s1") -> Any:
    return handle_command(
        raw,
        key=key.encode(),
        load_state=lambda spec, aggregate_id: spec.initial_state(aggregate_id),
        previous_result=lambda _: None,
        now=NOW,
        new_event_id=lambda: "e1",
        workspace_exists=lambda w: w in known,
        aggregate_workspace=owners.get,
    )


def test_a_command_naming_a_workspace_that_does_not_exist_is_refused() -> None:
    outcome = _tenant_handle(
        cmd("CreateSession", {"base_model": "m"}, workspace_id="ghost"),
        known={"default"},
        owners={},
    )
    assert isinstance(outcome, Refused)
    assert outcome.result.field == "workspace_id"
    assert outcome.result.reason == "workspace ghost does not exist"
    assert outcome.result.workspace_id == "ghost"


def test_an_aggregate_of_another_workspace_answers_as_if_it_did_not_exist() -> None:
    outcome = _tenant_handle(
        cmd("EndSession", {}, workspace_id="acme"), known={"default", "acme"}, owners={"s1": "w2"}
    )
    assert isinstance(outcome, Refused)
    assert (outcome.result.reason, outcome.result.field) == (
        "session s1 does not exist",
        "aggregate_id",
    )


def test_events_and_results_carry_the_commands_workspace() -> None:
    outcome = _tenant_handle(
        cmd("CreateSession", {"base_model": "m"}, workspace_id="acme"),
        known={"default", "acme"},
        owners={},
    )
    assert isinstance(outcome, Accepted)
    assert outcome.result.workspace_id == "acme"
    assert [e.workspace_id for e in outcome.events] == ["acme"]


def test_a_command_that_names_no_workspace_acts_in_the_default_one() -> None:
    fresh = _tenant_handle(cmd("CreateSession", {"base_model": "m"}), known=set(), owners={})
    assert isinstance(fresh, Accepted) and fresh.events[0].workspace == "default"


def test_an_aggregate_id_of_another_type_is_refused_not_crashed_on() -> None:
    session_state = InMemoryAggregates()
    session_state.handle(cmd("CreateSession", {"base_model": "m"}))
    outcome = handle_command(
        CommandEnvelope(
            command_id="c9", type="CreateWorkspace", aggregate_id="s1", payload={}
        ).to_bytes(),
        key=b"s1",
        load_state=session_state._load,
        previous_result=lambda _: None,
        now=NOW,
        new_event_id=lambda: "e9",
    )
    assert isinstance(outcome, Refused) and outcome.result.category == "user"
    assert outcome.result.field == "aggregate_id"


def test_a_payload_naming_another_workspace_than_its_envelope_is_refused() -> None:
    secret = {"workspace_id": "acme", "name": "hf_token", "version": 1, "digest": "ab" * 32}
    outcome = _tenant_handle(
        cmd("CreateSecret", secret, workspace_id="default", aggregate_id="secret:acme:hf_token"),
        known={"default", "acme"},
        owners={},
        key="secret:acme:hf_token",
    )
    assert isinstance(outcome, Refused)
    assert outcome.result.field == "payload.workspace_id"
