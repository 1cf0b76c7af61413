"""A Loops session with a run, driven through Kafka as the API drives it."""

from __future__ import annotations

import time
import uuid
from typing import Any

from commands.bus import CommandBus, Destination
from commands.envelope import CommandEnvelope
from infra.settings import Settings
from tests.integration.read_models import query, wait_for_result


class Driver:
    """Sends commands and work requests, waits for their results in the futures table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus = CommandBus(settings)

    def call(
        self, to: Destination, type_: str, aggregate_id: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        envelope = CommandEnvelope(
            command_id=str(uuid.uuid4()), type=type_, aggregate_id=aggregate_id, payload=payload
        )
        self.bus.send(envelope, to=to)
        return wait_for_result(self.settings, envelope.command_id)

    def ok(self, to: Destination, type_: str, aggregate_id: str, payload: dict) -> dict[str, Any]:
        result = self.call(to, type_, aggregate_id, payload)
        assert result["status"] == "accepted", result
        return result["output"] or {}


def new_loop(services: Settings) -> tuple[Driver, str, str, str]:
    """A fresh session with one run on the tiny model: (driver, session, run, sampler) ids."""
    driver = Driver(services)
    session_id, run_id, sampler_id = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("s", "r", "p"))
    driver.ok("commands", "CreateSession", session_id, {"base_model": "loopstream/tiny-llama"})
    driver.ok(
        "commands",
        "CreateRun",
        session_id,
        {"run_id": run_id, "sampler_id": sampler_id, "max_seq_len": 64},
    )
    # The workers find runs in the read model: wait until the projection has it.
    for _ in range(100):
        if query(services, "select 1 from {schema}.samplers where sampler_id = %s", sampler_id):
            break
        time.sleep(0.05)
    return driver, session_id, run_id, sampler_id


def datum(tokens: list[int]) -> dict[str, Any]:
    return {
        "model_input": tokens[:-1],
        "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    }
