from __future__ import annotations

from typing import ClassVar

import pytest

from events.catalog import EventCatalog, UnknownEventType, UnsupportedSchemaVersion
from events.envelope import EventEnvelope, utc_now
from events.ids import uuid7
from events.kafka_log import murmur2, partition_for
from events.loops import DomainEvent


class ThingRenamed(DomainEvent):
    """Test-only event at schema v3: v1 had `name`, v2 renamed it to `title`, v3 added `tags`."""

    schema_version: ClassVar[int] = 3
    thing_id: str
    title: str
    tags: tuple[str, ...]


def catalog_with_history() -> EventCatalog:
    catalog = EventCatalog((ThingRenamed,))

    @catalog.register_upcaster("ThingRenamed", from_version=1)
    def _v1_to_v2(payload: dict) -> dict:
        payload = dict(payload)
        payload["title"] = payload.pop("name")
        return payload

    @catalog.register_upcaster("ThingRenamed", from_version=2)
    def _v2_to_v3(payload: dict) -> dict:
        return {**payload, "tags": []}

    return catalog


def envelope(type_: str, version: int, payload: dict) -> EventEnvelope:
    return EventEnvelope(
        event_id=str(uuid7()), type=type_, schema_version=version, aggregate_type="thing",
        aggregate_id="t1", sequence=1, occurred_at=utc_now(), payload=payload,
    )  # fmt: skip


def test_old_payload_is_upcast_through_the_chain() -> None:
    event = catalog_with_history().decode(
        envelope("ThingRenamed", 1, {"thing_id": "t", "name": "n"})
    )
    assert event == ThingRenamed(thing_id="t", title="n", tags=())


def test_newer_schema_than_the_code_is_refused() -> None:
    with pytest.raises(UnsupportedSchemaVersion, match="newer"):
        catalog_with_history().decode(envelope("ThingRenamed", 4, {}))


def test_unknown_type_is_refused() -> None:
    with pytest.raises(UnknownEventType):
        catalog_with_history().decode(envelope("Nope", 1, {}))


def test_uuid7_is_time_ordered_and_versioned() -> None:
    ids = [uuid7(unix_ms=ms) for ms in (1000, 2000, 3000)]
    assert ids == sorted(ids)
    assert all(u.version == 7 and u.variant == "specified in RFC 4122" for u in ids)


@pytest.mark.parametrize(
    ("key", "expected"),
    [  # vectors from Kafka's own UtilsTest
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_matches_the_java_client(key: str, expected: int) -> None:
    assert murmur2(key.encode()) == expected


def test_partition_is_stable_and_in_range() -> None:
    assert all(0 <= partition_for(f"k{i}".encode(), 3) < 3 for i in range(100))
    assert partition_for(b"session-1", 7) == partition_for(b"session-1", 7)
