"""Smoke flow: a Loops session through the real pipeline, read back from the projections.

Commands go to Kafka with the CommandBus; the command processor (a separate process) turns them
into events exactly once; the projection runner (another process) writes the read models; this
flow polls the futures table (`command_results`) like an API client would and prints the session
as the read side sees it. The checkpoint's file is a real object in the S3 store.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from infra.processes import StackError
from infra.s3 import ObjectStore
from infra.settings import Settings

# The live schema of the Loops projection (see docs/projections.md).
DEFAULT_SCHEMA = "loops"


def run_smoke(settings: Settings, *, timeout_s: float = 60.0) -> dict[str, Any]:
    started = time.monotonic()
    session_id = f"smoke-{uuid.uuid4().hex[:8]}"
    run_id, sampler_id, checkpoint_id = (f"{p}{uuid.uuid4().hex[:8]}" for p in "rpc")

    weights = b"tiny weights " * 64
    key = f"checkpoints/{run_id}/weights/step-0/model.safetensors"
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    store.put_bytes(key, weights)

    def command(type_: str, payload: dict[str, Any]) -> CommandEnvelope:
        return CommandEnvelope(
            command_id=str(uuid.uuid4()),
            type=type_,
            aggregate_id=session_id,
            actor="smoke",
            correlation_id=session_id,
            payload=payload,
        )

    commands = [
        command("CreateSession", {"base_model": "loopstream/tiny-llama", "project": "smoke"}),
        command("CreateRun", {"run_id": run_id, "sampler_id": sampler_id, "max_seq_len": 256}),
        command(
            "RecordCheckpoint",
            {
                "run_id": run_id,
                "checkpoint_id": checkpoint_id,
                "name": "step-0",
                "kind": "weights",
                "files": [
                    {
                        "relative_file_name": "model.safetensors",
                        "size_bytes": len(weights),
                        "sha256": hashlib.sha256(weights).hexdigest(),
                    }
                ],
                "step": 0,
            },
        ),
    ]
    CommandBus(settings).send_many(commands)
    results = _wait_for_results(settings, [c.command_id for c in commands], timeout_s=timeout_s)
    rejected = [r for r in results if r["status"] != "accepted"]
    if rejected:
        raise StackError(f"smoke commands rejected: {rejected}")
    session = _read_session(settings, session_id, timeout_s=timeout_s)
    session["round_trip_ms"] = round((time.monotonic() - started) * 1000, 1)
    return session


def _wait_for_results(
    settings: Settings, command_ids: list[str], *, timeout_s: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_conninfo, row_factory=dict_row, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute(
                f"select command_id, command_type, status, reason, field "
                f"from {DEFAULT_SCHEMA}.command_results where command_id = any(%s)",
                (command_ids,),
            ).fetchall()
            if len(rows) == len(command_ids):
                return rows
            time.sleep(0.1)
    raise StackError(
        f"no results for the smoke commands after {timeout_s}s: are the command processor and "
        "projections running? (`loopstream services up`; logs under .loopstream/logs)"
    )


def _read_session(settings: Settings, session_id: str, *, timeout_s: float) -> dict[str, Any]:
    # command_results and the session rows come from different topics: wait for both.
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_conninfo, row_factory=dict_row, autocommit=True) as conn:
        while time.monotonic() < deadline:
            session = conn.execute(
                f"select session_id, base_model, project, status "
                f"from {DEFAULT_SCHEMA}.sessions where session_id = %s",
                (session_id,),
            ).fetchone()
            checkpoints = conn.execute(
                f"select checkpoint_id, uri, total_size_bytes, status "
                f"from {DEFAULT_SCHEMA}.checkpoints where session_id = %s",
                (session_id,),
            ).fetchall()
            if session and checkpoints:
                session["runs"] = conn.execute(
                    f"select run_id, sampler_id, max_seq_len, status "
                    f"from {DEFAULT_SCHEMA}.runs where session_id = %s",
                    (session_id,),
                ).fetchall()
                session["checkpoints"] = checkpoints
                return session
            time.sleep(0.1)
    raise StackError(f"session {session_id} did not reach the read models in {timeout_s}s")
