"""Helpers for integration tests: isolated topic sets, reading topics, running the processor,
waiting for a condition, making a workspace."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from api.bootstrap import send_and_wait
from commands.access import CreateWorkspace, aggregate_id_of
from commands.envelope import CommandEnvelope, CommandResult
from commands.processor import CommandProcessor
from events.envelope import EventEnvelope
from events.kafka_log import partition_count, read_partition
from infra.settings import Settings
from infra.topics import provision_topics


def isolated_settings(settings: Settings, **overrides: object) -> Settings:
    """The shared stack with a topic prefix of its own, so tests never see each other's data."""
    isolated = settings.model_copy(
        update={"topic_prefix": f"test-{uuid.uuid4().hex[:10]}", **overrides}
    )
    provision_topics(isolated)
    return isolated


def read_topic(settings: Settings, name: str) -> list[tuple[int, bytes | None, bytes | None, list]]:
    """(partition, key, value, headers) of every committed record of a catalog topic."""
    topic = settings.topic(name)
    records = []
    for partition in range(partition_count(settings, topic)):
        for message in read_partition(settings, topic, partition):
            records.append((partition, message.key(), message.value(), message.headers() or []))
    return records


def read_events(settings: Settings) -> list[EventEnvelope]:
    return [EventEnvelope.from_bytes(value) for _, _, value, _ in read_topic(settings, "events")]


def read_results(settings: Settings) -> dict[str, CommandResult]:
    results = {}
    for _, _, value, _ in read_topic(settings, "command-results"):
        result = CommandResult.model_validate_json(value)
        results[result.command_id] = result
    return results


def wait_for_results(
    settings: Settings, command_ids: Iterable[str], *, timeout_s: float = 60.0
) -> dict[str, CommandResult]:
    wanted = set(command_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        results = read_results(settings)
        if wanted <= results.keys():
            return results
        if time.monotonic() > deadline:
            missing = sorted(wanted - results.keys())
            raise TimeoutError(f"{len(missing)} results missing, e.g. {missing[:3]}")
        time.sleep(0.3)


@contextmanager
def running_processor(settings: Settings) -> Iterator[CommandProcessor]:
    processor = CommandProcessor(settings)
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        yield processor
    finally:
        processor.stop_requested.set()
        thread.join(30)


def command(
    type_: str, aggregate_id: str, payload: dict | None = None, **fields: object
) -> CommandEnvelope:
    return CommandEnvelope(
        command_id=str(fields.pop("command_id", uuid.uuid4())),
        type=type_,
        aggregate_id=aggregate_id,
        payload=payload or {},
        **fields,  # type: ignore[arg-type]
    )


def committed_offsets(settings: Settings, group: str, topic: str) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    consumer.close()
    return committed


def until(check: Callable[[], Any], what: str, *, timeout_s: float) -> Any:
    """`check()`'s first truthy value; fails the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.1)


def create_workspace(settings: Settings, prefix: str, name: str) -> str:
    """A new workspace `<prefix>-<random>`, created through the commands topic (as the CLI does)
    and answered before this returns."""
    workspace = f"{prefix}-{uuid.uuid4().hex[:12]}"
    send_and_wait(
        settings,
        CommandEnvelope(
            command_id=f"test-workspace-{workspace}",
            type="CreateWorkspace",
            aggregate_id=aggregate_id_of(workspace),
            actor="test",
            workspace_id=workspace,
            payload=CreateWorkspace(name=name).model_dump(mode="json"),
        ),
    )
    return workspace
