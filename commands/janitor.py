"""The checkpoint janitor: a process manager for checkpoint expiry and object deletion.

    python -m commands.janitor

It reacts to events and acts on the world:
- `CheckpointSaved` with an `expires_at`: when that time passes, it sends `DeleteCheckpoint`
  (reason `expired`) to the session, with a command id derived from the checkpoint, so a
  repeated decision is a duplicate and changes nothing. The session refuses to expire a link
  of a live delta chain or what a sampler serves; such a checkpoint is asked again (a new
  command id, derived from the event) only when its session's chains change: a new base, a
  deletion, a run stopping. Never in a loop;
- `CheckpointTtlChanged`: the checkpoint now expires at the new time (or never), under a new
  command id derived from the change, so an expiry sent or refused before it does not stand in
  for the new one. The session refuses an expiry that is not due (yet, or any more), so one
  decided just before a change deletes nothing;
- `CheckpointDeleted` (by a user, by expiry, by keep-last retention): it removes the
  checkpoint's objects from the S3 store. Deleting a prefix twice is harmless.

Its state (checkpoints waiting to expire) is rebuilt by reading the event log from the start,
so it needs no store of its own; it keeps no consumer-group offsets.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer

from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from commands.tinker_sessions import TinkerSessionReaper
from events.catalog import decode_payload
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope, utc_now
from events.kafka_log import assign_all, consumer_config
from events.loops import (
    CheckpointDeleted,
    CheckpointSaved,
    CheckpointTtlChanged,
    RunStopped,
    SessionEnded,
)
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.s3 import ObjectStore
from infra.settings import Settings

log = logging.getLogger("loopstream.janitor")

WATCHED = {
    b"CheckpointSaved",
    b"CheckpointDeleted",
    b"CheckpointTtlChanged",
    b"RunStopped",
    b"SessionEnded",
    b"SessionCreated",  # Tinker sessions (commands/tinker_sessions.py)
}


@dataclass(frozen=True)
class Expiring:
    checkpoint_id: str
    session_id: str
    expires_at: datetime
    # The latest event since its save that may have freed it from a chain: part of the expiry's
    # command id, so a refused expiry is asked again after it (and only then).
    retry_after: str = ""
    # The session's workspace: an expiry sent in another would find no session.
    workspace_id: str = DEFAULT_WORKSPACE

    @property
    def command_id(self) -> str:
        suffix = f"-after-{self.retry_after}" if self.retry_after else ""
        return f"expire-{self.checkpoint_id}{suffix}"


class CheckpointJanitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus = CommandBus(settings)
        self.checkpoints = CheckpointStore(ObjectStore.from_settings(settings))
        self.expiring: dict[str, Expiring] = {}
        self.expiry_sent: set[str] = set()  # command ids sent by this process
        self.stop_requested = threading.Event()
        self.tinker = TinkerSessionReaper(settings, self.bus)
        topic = settings.topic("events")
        self.consumer = Consumer(
            consumer_config(settings, group_id=f"{settings.topic_prefix}-janitor")
        )
        assign_all(self.consumer, settings, topic, OFFSET_BEGINNING)

    def run(self) -> None:
        log.info("janitor started")
        try:
            while not self.stop_requested.is_set():
                for message in self.consumer.consume(num_messages=500, timeout=0.5):
                    if message.error() is None:
                        self.observe(message.headers() or [], message.value())
                self.expire(now=utc_now())
                self.end_tinker_sessions(now=utc_now())
        finally:
            self.consumer.close()

    def observe(self, headers: Any, value: bytes | None) -> None:
        if dict(headers).get("event_type") not in WATCHED:
            return
        envelope = EventEnvelope.from_bytes(value)
        event = decode_payload(envelope)
        self.tinker.observe(event, envelope.occurred_at, envelope.workspace_id)
        if _may_free_a_chain(event):
            self._retry_refused(envelope.aggregate_id, after=envelope.event_id)
        if isinstance(event, CheckpointSaved) and event.expires_at is not None:
            self.expiring[event.checkpoint_id] = Expiring(
                event.checkpoint_id,
                event.session_id,
                event.expires_at,
                workspace_id=envelope.workspace,
            )
        if isinstance(event, CheckpointTtlChanged):
            self.expiring.pop(event.checkpoint_id, None)
            if event.expires_at is not None:
                self.expiring[event.checkpoint_id] = Expiring(
                    event.checkpoint_id,
                    event.session_id,
                    event.expires_at,
                    retry_after=envelope.event_id,
                    workspace_id=envelope.workspace,
                )
        if isinstance(event, CheckpointDeleted):
            self.expiring.pop(event.checkpoint_id, None)
            removed = self.checkpoints.delete(CheckpointRef.from_uri(event.uri))
            if removed:
                log.info(
                    "checkpoint objects removed",
                    extra={"uri": event.uri, "objects": removed, "reason": event.reason},
                )

    def end_tinker_sessions(self, *, now: datetime) -> list[str]:
        try:
            return self.tinker.end_due(now=now)
        except Exception:  # PostgreSQL away: checkpoints still expire; try again next turn
            log.exception("tinker session check failed")
            return []

    def _retry_refused(self, session_id: str, *, after: str) -> None:
        """The session's chains changed: checkpoints of it that wait to expire get a fresh
        command id, so one that was refused as a needed link is asked again once due."""
        for e in list(self.expiring.values()):
            if e.session_id == session_id:
                self.expiring[e.checkpoint_id] = replace(e, retry_after=after)

    def expire(self, *, now: datetime) -> list[str]:
        due = [
            e
            for e in self.expiring.values()
            if e.expires_at <= now and e.command_id not in self.expiry_sent
        ]
        if not due:
            return []
        self.bus.send_many(
            CommandEnvelope(
                command_id=e.command_id,
                type="DeleteCheckpoint",
                aggregate_id=e.session_id,
                actor="janitor",
                workspace_id=e.workspace_id,
                payload={"checkpoint_id": e.checkpoint_id, "reason": "expired"},
            )
            for e in due
        )
        self.expiry_sent.update(e.command_id for e in due)
        return [e.checkpoint_id for e in due]


def _may_free_a_chain(event: object) -> bool:
    """Events after which a checkpoint refused as a needed chain link may be deletable: a
    deletion (its dependent may be gone), a new base (the sampler leaves the old chain), a run
    or session stopping (no sampler serves it any more)."""
    if isinstance(event, CheckpointSaved):
        return event.kind == "sampler_weights" and event.checkpoint_type != "delta"
    return isinstance(event, CheckpointDeleted | RunStopped | SessionEnded)


def main() -> None:
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging()
    janitor = CheckpointJanitor(get_settings())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: janitor.stop_requested.set())
    janitor.run()


if __name__ == "__main__":
    main()
