"""Synthetic, valid Loops histories: for the projection tests, the benchmark and demos.

Each session is a realistic life (created, a run and its sampler, checkpoints saved and some
deleted, weight syncs and the sampler's hotloads, a promotion, stopped, ended) with gap-free
sequences per aggregate (session and sampler); sessions are interleaved so that a batch mixes
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
    CheckpointPromoted,
    CheckpointSaved,
    DomainEvent,
    RunCreated,
    RunStopped,
    SamplerCreated,
    SamplerStopped,
    SessionCreated,
    SessionEnded,
    WeightsReady,
)
from events.work import HotloadStarted, HotloadSucceeded, SamplerReady, WeightsLoaded

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SampleMessage:
    topic: str  # "events" or "command-results" (catalog names, without prefix)
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def session_history(index: int, *, checkpoints: int) -> list[tuple[str, DomainEvent]]:
    """(aggregate id, event) in order: the session's events and its sampler's."""
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
        SamplerReady(base_model=model, content_digest="0" * 64, load_ms=5.0),
    ]
    syncs = 0
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
        kind = "sampler_weights" if step % 4 == 1 else "weights"
        uri = f"bt://loops:{run_id}/{kind}/{name}"
        events.append(
            CheckpointSaved(
                checkpoint_id=checkpoint_id,
                run_id=run_id,
                session_id=session_id,
                name=name,
                kind=kind,
                uri=uri,
                files=files,
                total_size_bytes=sum(f.size_bytes for f in files),
                step=step,
                checkpoint_type=("base" if syncs == 0 else "delta") if kind != "weights" else None,
                chain_position=syncs if kind != "weights" else None,
            )
        )
        if kind == "sampler_weights":
            syncs += 1
            digest = hashlib.sha256(checkpoint_id.encode()).hexdigest()
            events += _sync(sampler_id, run_id, session_id, checkpoint_id, uri, digest, syncs)
            if syncs == 1:
                events.append(
                    CheckpointPromoted(checkpoint_id=checkpoint_id, run_id=run_id,
                                       session_id=session_id, uri=uri, environment="production")
                )  # fmt: skip
        if step % 3 == 2 and kind == "weights":
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
    return [(sampler_id if e.aggregate_type == "sampler" else session_id, e) for e in events]


def _sync(
    sampler_id: str,
    run_id: str,
    session_id: str,
    checkpoint_id: str,
    uri: str,
    digest: str,
    version: int,
) -> list[DomainEvent]:
    """A weight sync (session) and the sampler's hotload of it."""
    kind = "base" if version == 1 else "delta"
    return [
        WeightsReady(sampler_id=sampler_id, run_id=run_id, session_id=session_id,
                     checkpoint_id=checkpoint_id, uri=uri, content_digest=digest,
                     weights_version=version, checkpoint_type=kind),
        HotloadStarted(checkpoint_id=checkpoint_id, uri=uri, from_digest="0" * 64,
                       weights_version=version),
        HotloadSucceeded(checkpoint_id=checkpoint_id, uri=uri, checkpoint_type=kind,
                         content_digest=digest, folders_applied=1, bytes_moved=2001,
                         fetch_ms=3.0, apply_ms=1.0, total_ms=4.0, weights_version=version,
                         prompt_cache_entries_dropped=0),
        WeightsLoaded(checkpoint_id=checkpoint_id, uri=uri, content_digest=digest, load_ms=4.0,
                      weights_version=version),
    ]  # fmt: skip


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
    sequences: dict[str, int] = {}
    for position in range(max(len(h) for h in histories)):
        for index, history in enumerate(histories):
            if position >= len(history) or emitted >= event_count:
                continue
            aggregate_id, event = history[position]
            sequences[aggregate_id] = sequences.get(aggregate_id, 0) + 1
            occurred_at = EPOCH + timedelta(milliseconds=emitted)
            command_id = f"cmd-{seed}-{index}-{position}"
            yield (
                EventEnvelope(
                    event_id=str(uuid7(unix_ms=int(occurred_at.timestamp() * 1000))),
                    type=type(event).__name__,
                    schema_version=type(event).schema_version,
                    aggregate_type=event.aggregate_type,
                    aggregate_id=aggregate_id,
                    sequence=sequences[aggregate_id],
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
