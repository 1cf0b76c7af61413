"""Audit: an aggregate's whole history from the log, its causation chains, its state at any point.

Reads the events topic itself (the system of record), not a projection: the partition that owns
the aggregate is found with the same partitioner the processor uses, so one partition is read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import MappingProxyType
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer
from pydantic import BaseModel

from commands.registry import AGGREGATES
from events.catalog import CATALOG
from events.envelope import EventEnvelope
from events.kafka_log import (
    assign_all,
    consumer_config,
    partition_count,
    partition_for,
    read_partition,
)
from infra.settings import Settings


def history(
    settings: Settings, aggregate_id: str, *, workspace: str | None = None
) -> list[EventEnvelope]:
    """Every event of the aggregate, in order. With `workspace`, only events of that workspace:
    another workspace's aggregate has no history here (exactly like an id nobody used)."""
    topic = settings.topic("events")
    partition = partition_for(aggregate_id.encode(), partition_count(settings, topic))
    key = aggregate_id.encode()
    envelopes = (
        EventEnvelope.from_bytes(message.value())
        for message in read_partition(settings, topic, partition)
        if message.key() == key
    )
    return [e for e in envelopes if in_workspace(e, workspace)]


def scan(
    settings: Settings, keep: Callable[[EventEnvelope], bool], *, workspace: str | None = None
) -> list[EventEnvelope]:
    """Every event of the log (all partitions) that `keep` accepts: for ids that are not an
    aggregate's own, such as an API key inside its workspace. Slower than `history`."""
    topic = settings.topic("events")
    found: list[EventEnvelope] = []
    for partition in range(partition_count(settings, topic)):
        for message in read_partition(settings, topic, partition):
            envelope = EventEnvelope.from_bytes(message.value())
            if in_workspace(envelope, workspace) and keep(envelope):
                found.append(envelope)
    return found


def in_workspace(envelope: EventEnvelope, workspace: str | None) -> bool:
    """True without a workspace filter, else when the event is that workspace's (events written
    before tenancy are the default workspace's)."""
    return workspace is None or envelope.workspace == workspace


def state_as_of(
    envelopes: list[EventEnvelope], *, sequence: int | None = None, at: datetime | None = None
) -> Any:
    """The aggregate's state after the events up to `sequence` and/or up to time `at`.

    Aggregates with a decide/evolve in the registry (session, workspace, secret) fold with their
    own `evolve`; the workers' own streams (`trainer`, `sampler`), which no command decides, fold
    into a `WorkerStreamState`: what the worker reported last, per event type."""
    if not envelopes:
        return None
    spec = AGGREGATES.get(envelopes[0].aggregate_type)
    state: Any = (
        spec.initial_state(envelopes[0].aggregate_id)
        if spec is not None
        else WorkerStreamState(envelopes[0].aggregate_type, envelopes[0].aggregate_id)
    )
    for envelope in envelopes:
        if sequence is not None and envelope.sequence > sequence:
            break
        if at is not None and envelope.occurred_at > at:
            break
        state = spec.apply(state, envelope) if spec is not None else state.apply(envelope)
    return state


@dataclass(frozen=True)
class WorkerStreamState:
    """A trainer run's or a sampler's stream folded: its last event of each type (the newest
    `WeightsLoaded` is what a sampler serves, the newest `OptimStepCompleted` a run's step)."""

    aggregate_type: str
    aggregate_id: str
    version: int = 0  # sequence of the last event applied
    events: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )  # event type -> how many
    latest: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )  # event type -> the newest one (upcast, as the catalog reads it)

    def apply(self, envelope: EventEnvelope) -> WorkerStreamState:
        return dataclasses.replace(
            self,
            version=envelope.sequence,
            events=MappingProxyType(
                {**self.events, envelope.type: self.events.get(envelope.type, 0) + 1}
            ),
            latest=MappingProxyType({**self.latest, envelope.type: CATALOG.decode(envelope)}),
        )


@dataclass
class CausationNode:
    """A command or event, with what it caused beneath it."""

    id: str
    label: str
    children: list[CausationNode] = dataclasses.field(default_factory=list)


def causation_forest(envelopes: list[EventEnvelope]) -> list[CausationNode]:
    """Events grouped under their causes: a command's events under the command, an event caused
    by another event (a process manager's reaction) under that event."""
    nodes: dict[str, CausationNode] = {}
    roots: list[CausationNode] = []
    for envelope in envelopes:
        node = CausationNode(
            id=envelope.event_id,
            label=f"#{envelope.sequence} {envelope.type} at {envelope.occurred_at.isoformat()}"
            f" by {envelope.actor}",
        )
        nodes[envelope.event_id] = node
        cause = envelope.causation_id or envelope.command_id
        if cause in nodes:
            nodes[cause].children.append(node)
            continue
        if cause is None:
            roots.append(node)
            continue
        command = CausationNode(id=cause, label=f"command {cause}")
        nodes[cause] = command
        roots.append(command)
        command.children.append(node)
    return roots


def tail(
    settings: Settings,
    *,
    event_type: str | None = None,
    aggregate_id: str | None = None,
    correlation_id: str | None = None,
    workspace: str | None = None,
    from_beginning: bool = False,
    idle_timeout_s: float | None = None,
) -> Iterator[EventEnvelope]:
    """Live events matching the filters, as they are committed."""
    topic = settings.topic("events")
    consumer = Consumer(consumer_config(settings, group_id=f"loopstream-tail-{time.time_ns()}"))
    assign_all(consumer, settings, topic, OFFSET_BEGINNING if from_beginning else OFFSET_END)
    last_seen = time.monotonic()
    try:
        while idle_timeout_s is None or time.monotonic() - last_seen < idle_timeout_s:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            last_seen = time.monotonic()
            envelope = EventEnvelope.from_bytes(message.value())
            if event_type and envelope.type != event_type:
                continue
            if aggregate_id and envelope.aggregate_id != aggregate_id:
                continue
            if correlation_id and envelope.correlation_id != correlation_id:
                continue
            if not in_workspace(envelope, workspace):
                continue
            yield envelope
    finally:
        consumer.close()


def to_jsonable(value: Any) -> Any:
    """State dataclasses (with read-only maps, sets, enums and models inside) as plain JSON-ready
    data; sets become sorted lists, so the same state prints the same."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return to_jsonable(value.model_dump(mode="json"))
    if isinstance(value, dict | MappingProxyType):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v) for v in value), key=repr)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # anything else (bytes, Decimal, a path): readable, never a crash
