"""The event catalog: every event type, its current schema version, and upcasters.

Consumers never parse a payload by hand: `decode_payload(envelope)` upcasts an old payload to the
current version and validates it into the typed model. Upcasters are pure functions
`payload(vN) -> payload(vN+1)`, registered once, applied in a chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events.access import ACCESS_EVENTS
from events.async_requests import ASYNC_REQUEST_EVENTS
from events.deployments import DEPLOYMENT_EVENTS
from events.envelope import EventEnvelope
from events.loops import LOOPS_EVENTS, DomainEvent
from events.replicas import REPLICA_EVENTS
from events.secrets import SECRETS_EVENTS
from events.work import WORK_EVENTS

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UnknownEventType(ValueError):
    pass


class UnsupportedSchemaVersion(ValueError):
    pass


class EventCatalog:
    def __init__(self, event_types: tuple[type[DomainEvent], ...]) -> None:
        self.types: dict[str, type[DomainEvent]] = {t.__name__: t for t in event_types}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register_upcaster(
        self, event_type: str, from_version: int
    ) -> Callable[[Upcaster], Upcaster]:
        def register(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return register

    def model(self, event_type: str) -> type[DomainEvent]:
        try:
            return self.types[event_type]
        except KeyError:
            raise UnknownEventType(f"unknown event type {event_type!r}") from None

    def upcast(self, event_type: str, version: int, payload: Payload) -> Payload:
        current = self.model(event_type).schema_version
        if version > current:
            raise UnsupportedSchemaVersion(
                f"{event_type} schema_version {version} is newer than this code ({current})"
            )
        while version < current:
            try:
                payload = self._upcasters[(event_type, version)](payload)
            except KeyError:
                raise UnsupportedSchemaVersion(
                    f"no upcaster for {event_type} from schema_version {version}"
                ) from None
            version += 1
        return payload

    def decode(self, envelope: EventEnvelope) -> DomainEvent:
        payload = self.upcast(envelope.type, envelope.schema_version, dict(envelope.payload))
        return self.model(envelope.type).model_validate(payload)


CATALOG = EventCatalog(
    LOOPS_EVENTS
    + WORK_EVENTS
    + ACCESS_EVENTS
    + SECRETS_EVENTS
    + DEPLOYMENT_EVENTS
    + REPLICA_EVENTS
    + ASYNC_REQUEST_EVENTS
)


def decode_payload(envelope: EventEnvelope) -> DomainEvent:
    return CATALOG.decode(envelope)
