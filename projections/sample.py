"""Synthetic, valid Loops histories: for the projection tests, the benchmark and demos.

Each session is a realistic life (created, a run and its sampler, checkpoints saved and some
deleted, stopped, ended) with gap-free sequences; sessions are interleaved so that a batch mixes
aggregates, as a busy event log does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from commands.envelope import CommandResult, EventRef
from events.envelope import EventEnvelope
from events.ids import uuid7
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointSaved,
    DomainEvent,
    RunCreated,
    RunStopped,
    SamplerCreated,
    SamplerStopped,
    SessionCreated,
    SessionEnded,
)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SampleMessage:
    topic: str  # "events" or "command-results" (catalog names, without prefix)
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def session_history(index: int, *, checkpoints: int) -> list[DomainEvent]:
    session_id, run_id, sampler_id = f"ses-{index:07d}", f"run-{index:07d}", f"smp-{index:07d}"
    model = "Qwen/Qwen3-8B"
    events: list[DomainEvent] = [
        SessionCreated(session_id=session_id, base_model=model, project="bench", name=f"s{index}"),
        RunCreated(
            run_id=run_id,
            session_id=session_id,
            sampler_id=sampler_id,
            base_model=model,
            max_seq_len=4096,
            lora_rank=16 if index % 2 else 0,
        ),
        SamplerCreated(
            sampler_id=sampler_id, run_id=run_id, session_id=session_id, base_model=model
        ),
    ]
    for step in range(checkpoints):
        name = f"step-{step:05d}"
        files = tuple(
            CheckpointFile(
                relative_file_name=f"model-{i}.safetensors",
                size_bytes=1000 + i,
                sha256=hashlib.sha256(f"{run_id}/{name}/{i}".encode()).hexdigest(),
            )
            for i in range(2)
        )
        checkpoint_id = f"ckpt-{index:07d}-{step:05d}"
        uri = f"bt://loops:{run_id}/weights/{name}"
        events.append(
            CheckpointSaved(
                checkpoint_id=checkpoint_id,
                run_id=run_id,
                session_id=session_id,
                name=name,
                kind="weights",
                uri=uri,
                files=files,
                total_size_bytes=sum(f.size_bytes for f in files),
                step=step,
            )
        )
        if step % 3 == 2:
            events.append(
                CheckpointDeleted(
                    checkpoint_id=checkpoint_id,
                    run_id=run_id,
                    session_id=session_id,
                    uri=uri,
                    reason="retention",
                )
            )
    events += [
        RunStopped(run_id=run_id, session_id=session_id, reason="done"),
        SamplerStopped(sampler_id=sampler_id, run_id=run_id, session_id=session_id, reason="done"),
        SessionEnded(session_id=session_id, reason="done"),
    ]
    return events


def envelopes(
    event_count: int, *, sessions: int = 100, seed: int = 0
) -> Iterator[tuple[EventEnvelope, str]]:
    """About `event_count` envelopes over `sessions` sessions, interleaved. Yields (env, cmd_id)."""
    per_session = max(event_count // sessions, 7)
    # Enough checkpoints (each third one deleted again) to reach the count; the rest is cut off.
    checkpoints = max((per_session - 6) * 3 // 4 + 1, 0)
    histories = [
        session_history(seed * 1_000_000 + i, checkpoints=checkpoints) for i in range(sessions)
    ]
    emitted = 0
    for position in range(max(len(h) for h in histories)):
        for index, history in enumerate(histories):
            if position >= len(history) or emitted >= event_count:
                continue
            event = history[position]
            aggregate_id = getattr(event, "session_id")  # noqa: B009 - every Loops event has one
            occurred_at = EPOCH + timedelta(milliseconds=emitted)
            command_id = f"cmd-{seed}-{index}-{position}"
            yield (
                EventEnvelope(
                    event_id=str(uuid7(unix_ms=int(occurred_at.timestamp() * 1000))),
                    type=type(event).__name__,
                    schema_version=type(event).schema_version,
                    aggregate_type="session",
                    aggregate_id=aggregate_id,
                    sequence=position + 1,
                    occurred_at=occurred_at,
                    command_id=command_id,
                    causation_id=command_id,
                    correlation_id=f"corr-{seed}-{index}",
                    actor="bench",
                    payload=event.model_dump(mode="json"),
                ),
                command_id,
            )
            emitted += 1


def messages(event_count: int, *, sessions: int = 100, seed: int = 0) -> Iterator[SampleMessage]:
    """Events and, for each, the accepted command result that announced it."""
    for envelope, command_id in envelopes(event_count, sessions=sessions, seed=seed):
        yield SampleMessage(
            "events",
            envelope.aggregate_id.encode(),
            envelope.to_bytes(),
            tuple(envelope.kafka_headers()),
        )
        result = CommandResult(
            command_id=command_id,
            command_type="Sample",
            aggregate_id=envelope.aggregate_id,
            status="accepted",
            events=(
                EventRef(
                    event_id=envelope.event_id, type=envelope.type, sequence=envelope.sequence
                ),
            ),
            correlation_id=envelope.correlation_id,
            processed_at=envelope.occurred_at,
        )
        yield SampleMessage("command-results", command_id.encode(), result.to_bytes())
