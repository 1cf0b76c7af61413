"""Drive loopstream over Kafka directly, as the API does, for tools, benchmarks and tests.

The REST API and its SDK are the front door for users; this is the side door for code that
lives next to the platform: it sends commands and work requests with the CommandBus and reads
their results from the futures table (`command_results`), with no HTTP in between.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from commands.bus import CommandBus, Destination
from commands.envelope import CommandEnvelope
from infra.settings import Settings


class NotAccepted(RuntimeError):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(
            f"{result.get('command_type')} {result['status']}: {result.get('reason')} "
            f"(field {result.get('field')})"
        )
        self.result = result


def wait_for_result(
    settings: Settings, request_id: str, *, timeout_s: float = 60
) -> dict[str, Any]:
    """The futures-table row of a request, once the projection has written it."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                f"select * from {settings.read_schema}.command_results where command_id = %s",
                (request_id,),
            ).fetchone()
            if row is not None:
                return row
            time.sleep(0.05)
    raise TimeoutError(f"no result for {request_id} in {timeout_s}s")


def query(settings: Settings, sql: str, *params: object) -> list[dict[str, Any]]:
    """Rows of a read-model query; `{schema}` in `sql` names the read models' schema."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql.format(schema=settings.read_schema), params).fetchall()


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
        """The call's output; NotAccepted (with the result) if it was rejected or failed."""
        result = self.call(to, type_, aggregate_id, payload)
        if result["status"] != "accepted":
            raise NotAccepted(result)
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
    """A cross-entropy training example for next-token prediction on `tokens`."""
    return {
        "model_input": tokens[:-1],
        "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    }
