"""What an id names, for `loopstream audit history`: one aggregate, or the aggregates behind it.

Most ids are an aggregate's own, and their history is one partition of the events topic: a
session, a run (its `trainer` stream), a sampler, a workspace, a secret (`secret:<workspace>:
<name>`); a workspace's or a secret's is also found by the plain workspace id or secret name
(the secret in `--workspace`, else the default workspace). Three kinds of id are not:
- a Tinker model id `<session>:train:<n>`: the loops session made for it, its run and sampler;
- a Tinker session id: the loops sessions made for its models (each named `tinker <model id>`),
  each with its run and sampler;
- an API key id: the key's own events (created, revoked) inside its workspace.
The last two are found by reading the whole log, so only when the id has no history of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.tinker import ids
from commands.access import aggregate_id_of as workspace_aggregate_id
from commands.envelope import DEFAULT_WORKSPACE
from commands.secrets import secret_aggregate_id
from commands.tinker_sessions import NAME_PREFIX, tinker_session_of
from events.audit import history, scan, state_as_of
from events.envelope import EventEnvelope
from infra.settings import Settings


@dataclass(frozen=True)
class Subject:
    """One audited thing: the events to show, and the history its state folds from."""

    kind: str  # session, trainer, sampler, workspace, secret, api key
    id: str
    events: list[EventEnvelope]  # shown: the aggregate's, or an entity's inside it
    aggregate: list[EventEnvelope]  # the whole aggregate's history (what the state folds)
    pick: Callable[[Any], Any] | None = None  # the entity's part of the aggregate's state

    def state(self, *, sequence: int | None = None, at: datetime | None = None) -> Any:
        state = state_as_of(self.aggregate, sequence=sequence, at=at)
        return self.pick(state) if self.pick is not None and state is not None else state


def subjects(
    settings: Settings, resource_id: str, *, workspace: str | None = None
) -> list[Subject]:
    """Everything `resource_id` names, each with its events; empty for an id nobody used (or
    one of another workspace, with `workspace`)."""
    candidates = (
        resource_id,
        workspace_aggregate_id(resource_id),
        secret_aggregate_id(workspace or DEFAULT_WORKSPACE, resource_id),
    )
    for aggregate_id in candidates:
        own = history(settings, aggregate_id, workspace=workspace)
        if own:
            return [_aggregate(aggregate_id, own)]
    if ids.run_id_of(resource_id) != resource_id:  # a Tinker model id
        session_id = ids.run_id_of(resource_id).replace("-train-", "-s-")
        return _loops_session(settings, session_id, workspace=workspace)
    found = scan(settings, lambda e: _names(e, resource_id), workspace=workspace)
    key_events = [e for e in found if e.type.startswith("ApiKey")]
    if key_events:
        workspace_id = key_events[0].aggregate_id
        whole = history(settings, workspace_id, workspace=workspace)
        return [
            Subject(
                kind="api key",
                id=resource_id,
                events=key_events,
                aggregate=whole,
                pick=lambda state: state.keys.get(resource_id),
            )
        ]
    return [
        subject
        for session_id in dict.fromkeys(e.aggregate_id for e in found)
        for subject in _loops_session(settings, session_id, workspace=workspace)
    ]


def _names(envelope: EventEnvelope, resource_id: str) -> bool:
    """An API key's event, or the creation of a loops session made for a Tinker session's model."""
    if envelope.type.startswith("ApiKey"):
        return envelope.payload.get("key_id") == resource_id
    if envelope.type == "SessionCreated":
        name = envelope.payload.get("name") or ""
        return name.startswith(NAME_PREFIX) and (
            tinker_session_of(name.removeprefix(NAME_PREFIX)) == resource_id
        )
    return False


def _aggregate(aggregate_id: str, events: list[EventEnvelope]) -> Subject:
    return Subject(kind=events[0].aggregate_type, id=aggregate_id, events=events, aggregate=events)


def _loops_session(settings: Settings, session_id: str, *, workspace: str | None) -> list[Subject]:
    """A loops session, then each of its runs' trainer and sampler streams."""
    events = history(settings, session_id, workspace=workspace)
    if not events:
        return []
    found = [_aggregate(session_id, events)]
    for run in state_as_of(events).runs.values():
        for aggregate_id in (run.run_id, run.sampler_id):
            stream = history(settings, aggregate_id, workspace=workspace)
            if stream:
                found.append(_aggregate(aggregate_id, stream))
    return found
