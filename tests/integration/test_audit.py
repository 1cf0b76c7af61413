"""Audit reads an aggregate's history from the log and folds it to any point in time."""

from __future__ import annotations

import uuid

from commands.bus import CommandBus
from events.audit import causation_forest, history, state_as_of, tail
from infra.settings import Settings
from tests.integration.kafka_helpers import (
    command,
    isolated_settings,
    running_processor,
    wait_for_results,
)


def test_history_causation_and_state_at_a_sequence(settings: Settings) -> None:
    s = isolated_settings(settings)
    sid = f"s{uuid.uuid4().hex[:8]}"
    other = f"s{uuid.uuid4().hex[:8]}"
    commands = [
        command("CreateSession", sid, {"base_model": "m"}, correlation_id="conv-1"),
        command("CreateSession", other, {"base_model": "m"}),
        command("CreateRun", sid, {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 8}),
        command("EndSession", sid, {"reason": "done"}, correlation_id="conv-1"),
    ]
    with running_processor(s):
        CommandBus(s).send_many(commands)
        wait_for_results(s, [c.command_id for c in commands])

    events = history(s, sid)
    assert [e.sequence for e in events] == list(range(1, 7))
    assert {e.aggregate_id for e in events} == {sid}

    forest = causation_forest(events)
    assert [node.id for node in forest] == [commands[0].command_id, commands[2].command_id,
                                            commands[3].command_id]  # fmt: skip
    assert [len(node.children) for node in forest] == [1, 2, 3]

    assert state_as_of(events, sequence=1).status == "active"
    assert state_as_of(events, sequence=3).runs["r1"].active
    final = state_as_of(events)
    assert final.status == "ended" and not final.runs["r1"].active
    assert state_as_of(events, at=events[0].occurred_at).version >= 1

    conversation = list(tail(s, correlation_id="conv-1", from_beginning=True, idle_timeout_s=3))
    assert [e.type for e in conversation] == [
        "SessionCreated", "RunStopped", "SamplerStopped", "SessionEnded",
    ]  # fmt: skip
