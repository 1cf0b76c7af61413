"""One registry: command type -> (payload model, aggregate), aggregate type -> decide/evolve.

The command processor and the replay/audit tools look everything up here, so adding a bounded
context is one `AggregateSpec` and one line in `AGGREGATES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from commands import access, deployments, loops, secrets
from commands.loops import Command
from events.catalog import CATALOG
from events.envelope import EventEnvelope
from events.loops import DomainEvent


@dataclass(frozen=True)
class AggregateSpec:
    aggregate_type: str
    commands: tuple[type[Command], ...]
    initial_state: Callable[[str], Any]
    decide: Callable[..., list[DomainEvent]]
    evolve: Callable[[Any, DomainEvent], Any]
    # Tenant-scoped aggregates belong to the workspace of their first event and refuse commands
    # of other workspaces; the workspace aggregate is its own tenant and checks that itself.
    tenant_scoped: bool = True

    def apply(self, state: Any, envelope: EventEnvelope) -> Any:
        """Fold a stored event into the state (upcast and validated on the way)."""
        return self.advance(state, CATALOG.decode(envelope), envelope.sequence)

    def advance(self, state: Any, event: DomainEvent, sequence: int) -> Any:
        """Fold a just-decided event into the state; its sequence becomes the state's version."""
        return replace(self.evolve(state, event), version=sequence)

    def decide_at(self, state: Any, command: Command, now: datetime) -> list[DomainEvent]:
        return self.decide(state, command, now=now)


SESSION = AggregateSpec(
    aggregate_type=loops.AGGREGATE_TYPE,
    commands=loops.COMMANDS,
    initial_state=loops.initial_state,
    decide=loops.decide,
    evolve=loops.evolve,
)

WORKSPACE = AggregateSpec(
    aggregate_type=access.AGGREGATE_TYPE,
    commands=access.COMMANDS,
    initial_state=access.initial_state,
    decide=access.decide,
    evolve=access.evolve,
    tenant_scoped=False,
)

SECRET = AggregateSpec(
    aggregate_type=secrets.AGGREGATE_TYPE,
    commands=secrets.COMMANDS,
    initial_state=secrets.initial_state,
    decide=secrets.decide,
    evolve=secrets.evolve,
)

MODEL = AggregateSpec(
    aggregate_type=deployments.AGGREGATE_TYPE,
    commands=deployments.COMMANDS,
    initial_state=deployments.initial_state,
    decide=deployments.decide,
    evolve=deployments.evolve,
)

AGGREGATES: dict[str, AggregateSpec] = {
    spec.aggregate_type: spec for spec in (SESSION, WORKSPACE, SECRET, MODEL)
}
COMMAND_TYPES: dict[str, tuple[type[Command], AggregateSpec]] = {
    command.__name__: (command, spec) for spec in AGGREGATES.values() for command in spec.commands
}
