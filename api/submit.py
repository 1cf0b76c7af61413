"""Handing commands to the bus, once per idempotency key.

The request id a client gets back is its idempotency key; the command id on Kafka is that key
within the caller's workspace (`<workspace>:<key>`), and the futures table answers for it. A
key this API already sent (recently, from memory) or that already has a result (from the
futures table) is not sent again: a re-post returns the same id and changes nothing. The
workers and the command processor dedupe by command id too, so a second send after an API
restart is harmless; skipping it just saves the round trip.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from api.errors import unprocessable
from api.queries import ReadModels
from commands.bus import CommandBus, Destination
from commands.envelope import CommandEnvelope
from events.envelope import DEFAULT_WORKSPACE

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_resource_id(length: int = 8) -> str:
    """A short lowercase id like the platform's (`k4q95w5`); matches commands.loops.RESOURCE_ID."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def derived_resource_id(key: str, salt: str, length: int = 8) -> str:
    """A stable id for an idempotent create: the same key names the same resource."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"loopstream:{salt}:{key}").int
    chars = []
    for _ in range(length):
        digest, index = divmod(digest, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[index])
    return "".join(chars)


@dataclass(frozen=True)
class RequestIds:
    """The two ids of one request. `request_id` is the idempotency key the client chose (or was
    given) and polls; `command_id`, the id on Kafka, is that key within the caller's workspace.
    The processor and the workers dedupe by command id, so one workspace's keys never meet
    another's (a guessed key cannot swallow someone else's command)."""

    request_id: str
    command_id: str
    chosen: bool  # by the client: a re-post with it must name the same resources


def command_id_for(workspace: str, request_id: str) -> str:
    return f"{workspace}:{request_id}"


def request_id_of(workspace: str, command_id: str) -> str:
    """The request id a client knows for a command id of its workspace (inverse of the above;
    ids the API did not make, such as an external producer's, come back as they are)."""
    return command_id.removeprefix(f"{workspace}:")


def resolve_request_id(
    *, header: str | None, query: str | None, body: str | None, workspace: str
) -> RequestIds:
    """The request's ids. One key may be given in several places, but they must agree."""
    given = {name: value for name, value in (("Idempotency-Key", header), ("request_id", query),
                                             ("body.request_id", body)) if value}  # fmt: skip
    if len(set(given.values())) > 1:
        raise unprocessable(
            f"request_id: the idempotency keys differ ({', '.join(sorted(given))})",
            field="request_id",
        )
    if given:
        key = next(iter(given.values()))
        if len(key) > 200:
            raise unprocessable("request_id: at most 200 characters", field="request_id")
    else:
        key = str(uuid.uuid4())
    return RequestIds(request_id=key, command_id=command_id_for(workspace, key), chosen=bool(given))


class SentRequests:
    """Ids this API process sent, for `request_retention_s`: the futures route answers
    "pending" for them until a result lands, and "unknown request" for anything else."""

    def __init__(self, retention_s: float, max_entries: int = 200_000) -> None:
        self.retention_s = retention_s
        self.max_entries = max_entries
        # request id -> (when, the workspace that sent it)
        self._sent: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, request_id: str, *, workspace: str = DEFAULT_WORKSPACE) -> None:
        now = time.monotonic()
        with self._lock:
            self._sent[request_id] = (now, workspace)
            self._sent.move_to_end(request_id)
            self._prune(now)

    def recently_sent(self, request_id: str, *, workspace: str | None = None) -> bool:
        """Sent recently (by `workspace`, when given: another workspace's request is unknown)."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            sent = self._sent.get(request_id)
            return sent is not None and workspace in (None, sent[1])

    def _prune(self, now: float) -> None:
        while self._sent:
            oldest, (at, _) = next(iter(self._sent.items()))
            if now - at <= self.retention_s and len(self._sent) <= self.max_entries:
                return
            del self._sent[oldest]


class Submitter:
    def __init__(self, bus: CommandBus, sent: SentRequests, reads: ReadModels) -> None:
        self.bus = bus
        self.sent = sent
        self.reads = reads

    def already_submitted(self, request_id: str) -> bool:
        """Sent by this API recently, or answered already: a re-post, not a new request."""
        return self.sent.recently_sent(request_id) or self.reads.command_result_exists(request_id)

    def submit(self, envelope: CommandEnvelope, *, to: Destination) -> str:
        request_id = envelope.command_id
        if self.already_submitted(request_id):
            return request_id
        self.bus.send(envelope, to=to)  # returns once the broker has it (acks=all)
        self.sent.remember(request_id, workspace=envelope.workspace_id)
        return request_id
