"""From raw Kafka records to a planned batch: row changes, dead letters, next offsets.

Pure and transport-free: the faust runner and the replay tool (confluent-kafka) both turn their
messages into `SourceRecord`s and share this code, so live and replayed read models cannot drift.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError, create_model
from pydantic_core import SchemaValidator

from commands.envelope import CommandResult
from events.catalog import CATALOG, UnknownEventType, UnsupportedSchemaVersion
from events.envelope import EventEnvelope
from events.loops import DomainEvent
from projections.access import project_access_event
from projections.async_requests import project_async_request_event
from projections.deployments import project_deployment_event
from projections.loops import event_log_row, project_event, project_result
from projections.rows import RowChange

TopicPartition = tuple[str, int]
_Item = TypeVar("_Item")
_Prepared = TypeVar("_Prepared")


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    # The broker's record timestamp (ms since the epoch): part of the log, so a replay sees the
    # same value; it dates a failure without reading the database clock.
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: SourceRecord
    error_type: str  # a stable, greppable name: invalid_envelope, unknown_event_type, ...
    reason: str


@dataclass(frozen=True, slots=True)
class Projected:
    record: SourceRecord
    changes: tuple[RowChange, ...]


@dataclass
class PlannedBatch:
    projected: list[Projected] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Per partition: the offset to resume from once this batch is committed.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def changes(self) -> list[RowChange]:
        return [change for item in self.projected for change in item.changes]

    def __len__(self) -> int:
        return len(self.projected) + len(self.dead_letters)


@dataclass(frozen=True, slots=True)
class ProjectionTopics:
    events: str
    command_results: str


def plan_batch(
    records: Iterable[SourceRecord],
    topics: ProjectionTopics,
    *,
    positions: dict[TopicPartition, int] | None = None,
) -> PlannedBatch:
    """Decode and project a batch. Records below the stored `positions` are already applied."""
    batch = PlannedBatch()
    for record in records:
        tp = (record.topic, record.partition)
        if positions is not None and record.offset < positions.get(tp, 0):
            continue
        batch.next_offsets[tp] = max(batch.next_offsets.get(tp, 0), record.offset + 1)
        outcome = project_record(record, topics)
        if isinstance(outcome, DeadLetter):
            batch.dead_letters.append(outcome)
        elif outcome is not None:
            batch.projected.append(outcome)
    return batch


def project_record(record: SourceRecord, topics: ProjectionTopics) -> Projected | DeadLetter | None:
    """The record's row changes, or why it cannot have any. Never raises on a record's content.

    A projector that raises on one event (a bug, or a value it did not expect) must not stop the
    projection: the runner would restart and fail at the same offset forever. The event becomes
    a dead letter and a recorded failure instead, which the health route and `replay --check`
    show.
    """
    try:
        return _project_record(record, topics)
    except Exception as exc:  # any projector bug is this record's failure, not a crash
        return DeadLetter(record, "projector_failed", f"{type(exc).__name__}: {exc}"[:500])


def _project_record(
    record: SourceRecord, topics: ProjectionTopics
) -> Projected | DeadLetter | None:
    if record.topic == topics.events:
        return _project_event_record(record)
    if record.topic == topics.command_results:
        return _project_result_record(record)
    return DeadLetter(record, "unexpected_topic", f"no projector for topic {record.topic!r}")


def _project_event_record(record: SourceRecord) -> Projected | DeadLetter:
    if record.value is None:
        return DeadLetter(record, "invalid_envelope", "empty value (tombstone) on the events topic")
    decoded = _decode_current(record.value)
    if decoded is None:
        return _project_event_record_checked(record)
    envelope, payload = decoded
    event: DomainEvent = envelope.payload  # type: ignore[assignment]  # typed by _wire_validator
    if envelope.aggregate_type != event.aggregate_type:
        return _project_event_record_checked(record)  # the checked path words the dead letter
    changes = (
        event_log_row(envelope, partition=record.partition, offset=record.offset, payload=payload),
        *project_event(envelope, event),
        *project_access_event(event, envelope),
        *project_deployment_event(event, envelope),
        *project_async_request_event(event, envelope),
    )
    return Projected(record, changes)


def _decode_current(value: bytes) -> tuple[EventEnvelope, dict[str, Any]] | None:
    """The fast path for the common case: an event of a known type at its current version.

    One JSON parse (orjson) and one validation of envelope and payload together, instead of a
    validation of the envelope (which builds the payload as a dict) followed by one of the
    payload. The wire payload is kept as parsed for `event_log`. Anything else (bad JSON, an
    unknown type, an old or newer version, an invalid envelope or payload) returns None and takes
    the checked path, which upcasts or words the dead letter exactly as before.
    """
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    model = CATALOG.types.get(data.get("type"))  # type: ignore[arg-type]
    version = data.get("schema_version")
    if model is None or type(version) is not int or version != model.schema_version:
        return None
    try:
        envelope = _wire_validator(model).validate_python(data)
    except ValidationError:
        return None
    return envelope, data["payload"]


@functools.cache
def _wire_validator(model: type[DomainEvent]) -> SchemaValidator:
    """The envelope with `payload` typed as `model`: same fields, same rules, one pass."""
    wire = create_model(f"{model.__name__}Envelope", __base__=EventEnvelope, payload=(model, ...))
    return wire.__pydantic_validator__


def _project_event_record_checked(record: SourceRecord) -> Projected | DeadLetter:
    """Envelope first, then the payload through the catalog (upcasters): every dead letter."""
    try:
        envelope = EventEnvelope.from_bytes(record.value)
    except ValidationError as exc:
        return DeadLetter(record, "invalid_envelope", _short(exc))
    try:
        model = CATALOG.model(envelope.type)
        event = CATALOG.decode(envelope)
    except UnknownEventType as exc:
        return DeadLetter(record, "unknown_event_type", str(exc))
    except UnsupportedSchemaVersion as exc:
        return DeadLetter(record, "unsupported_schema_version", str(exc))
    except ValidationError as exc:
        return DeadLetter(record, "invalid_payload", f"{envelope.type}: {_short(exc)}")
    if envelope.aggregate_type != model.aggregate_type:
        return DeadLetter(
            record,
            "wrong_aggregate_type",
            f"{envelope.type} belongs to {model.aggregate_type!r}, not {envelope.aggregate_type!r}",
        )
    changes = (
        event_log_row(envelope, partition=record.partition, offset=record.offset),
        *project_event(envelope, event),
        *project_access_event(event, envelope),
        *project_deployment_event(event, envelope),
        *project_async_request_event(event, envelope),
    )
    return Projected(record, changes)


def _project_result_record(record: SourceRecord) -> Projected | DeadLetter | None:
    if record.value is None:
        return None  # a compaction tombstone: nothing to project
    try:
        result = CommandResult.model_validate_json(record.value)
    except ValidationError as exc:
        return DeadLetter(record, "invalid_command_result", _short(exc))
    return Projected(
        record, (project_result(result, partition=record.partition, offset=record.offset),)
    )


def _short(exc: ValidationError, limit: int = 500) -> str:
    text = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )
    return text[:limit]


def overlapped(
    items: Iterable[_Item],
    prepare: Callable[[_Item], _Prepared],
    apply: Callable[[_Prepared], None],
) -> None:
    """`apply(prepare(item))` for each item in order, preparing item n+1 while n is applied.

    Decoding is Python (this process's core) and applying mostly waits for PostgreSQL (another
    process, another core); psycopg releases the GIL while it waits, so the two overlap. Batches
    are still applied one at a time and in order, and the first failure is raised here.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="apply") as pool:
        applying: Future[None] | None = None
        for item in items:
            prepared = prepare(item)
            if applying is not None:
                applying.result()
            applying = pool.submit(apply, prepared)
        if applying is not None:
            applying.result()


def relax_gc() -> None:
    """Call once per projection process, after imports.

    A batch allocates some thirty small objects per record, none of them in a reference cycle.
    With CPython's default threshold (700 allocations) the cyclic collector runs every few dozen
    records and rescans everything alive, the batch included: about a third of decoding time in
    the profile. Startup objects are frozen out of its scans and collections made rare.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def dead_letter_headers(letter: DeadLetter, *, projection: str) -> list[tuple[str, bytes]]:
    """The error travels in headers; the value stays the original bytes, untouched."""
    record = letter.record
    return [
        *record.headers,
        ("dlq.error_type", letter.error_type.encode()),
        ("dlq.reason", letter.reason.encode()),
        ("dlq.projection", projection.encode()),
        ("dlq.source_topic", record.topic.encode()),
        ("dlq.source_partition", str(record.partition).encode()),
        ("dlq.source_offset", str(record.offset).encode()),
    ]


def batch_offsets(records: Sequence[SourceRecord]) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        tp = (record.topic, record.partition)
        offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
    return offsets
