"""Which replica takes a request: least outstanding requests among a deployment's ready
replicas, at most `predict_concurrency` each; parking while there is none.

The ready replicas come from the `replicas` read model (the replica controller's events),
re-read every `REFRESH_S` by one background task for all deployments; actor handles are looked
up in Ray by name once per replica. A replica a call finds dead is dropped at once (until the
read model says it is back, which it will not: the controller replaces it with a new one).

Priorities: sync requests first. An async request (the async queue's workers) takes a free slot
only while no sync request of the same deployment is waiting for one (seed 003: "Sync requests
take priority over async requests when competing for concurrency slots").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine, text

log = logging.getLogger("loopstream.gateway")

REFRESH_S = 0.25
Priority = Literal["sync", "async"]


@dataclass
class Slot:
    replica_id: str
    deployment_id: str
    actor_name: str
    concurrency: int
    handle: Any = None
    in_flight: int = 0
    dead: bool = False


class NoReplica(Exception):
    """No replica became free within the wait (503: retry later)."""


class NotServing(Exception):
    """The deployment stopped serving (deactivated, deleted) while the request waited."""


# How often a waiting request asks whether its deployment still serves.
SERVING_CHECK_S = 1.0


@dataclass
class _Waiting:
    sync: int = 0
    async_: int = 0


@dataclass
class ReplicaPool:
    engine: Engine
    schema: str
    namespace: str
    # Called with a deployment id when a request parks there (no live replica): the traffic
    # recorder tells the replica controller at once instead of at its next flush.
    on_park: Callable[[str], None] = lambda _d: None
    slots: dict[str, dict[str, Slot]] = field(default_factory=lambda: defaultdict(dict))
    # deployment -> replicas of it in each state, for /metrics
    states: dict[str, dict[str, int]] = field(default_factory=dict)
    waiting: dict[str, _Waiting] = field(default_factory=lambda: defaultdict(_Waiting))
    _changed: asyncio.Condition | None = None
    _task: asyncio.Task[None] | None = None

    # --- the read model -------------------------------------------------------------------------

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:  # the database away for a moment: keep routing on what we know
                log.warning("replica refresh failed", exc_info=True)

    async def refresh(self) -> None:
        rows = await asyncio.to_thread(self._read)
        ready: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
        states: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for row in rows:
            states[row.deployment_id][row.status] += 1
            if row.status == "READY":
                ready[row.deployment_id][row.replica_id] = (
                    row.actor_name,
                    row.predict_concurrency or 1,
                )
        for deployment_id in set(self.slots) | set(ready):
            current = self.slots[deployment_id]
            wanted = ready.get(deployment_id, {})
            for replica_id in list(current):
                if replica_id not in wanted:
                    del current[replica_id]
            for replica_id, (name, concurrency) in wanted.items():
                if replica_id not in current:
                    current[replica_id] = Slot(replica_id, deployment_id, name, concurrency)
        self.states = {d: dict(s) for d, s in states.items()}
        await self._notify()

    def _read(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "select replica_id, deployment_id, status, actor_name, "
                        f"predict_concurrency from {self.schema}.replicas "
                        "where status in ('REQUESTED', 'STARTING', 'READY', 'DRAINING')"
                    )
                )
            )

    # --- routing --------------------------------------------------------------------------------

    def has_live_replicas(self, deployment_id: str) -> bool:
        return any(n for n in self.states.get(deployment_id, {}).values())

    async def acquire(
        self,
        deployment_id: str,
        *,
        wait_s: float,
        priority: Priority,
        still_serving: Callable[[], Awaitable[bool]] | None = None,
    ) -> Slot:
        """A free slot of a ready replica, the least busy; waits (parks) up to `wait_s`, asking
        `still_serving` every SERVING_CHECK_S while it waits: a deployment deactivated meanwhile
        gets no replica, and its waiting requests their 404 now rather than after the wait."""
        assert self._changed is not None, "start() first"
        deadline = time.monotonic() + wait_s
        waiting = self.waiting[deployment_id]
        # Counted as waiting from the start: the traffic record of a parked request (sent at
        # once, below) must already include it, and async requests yield to it.
        if priority == "sync":
            waiting.sync += 1
        else:
            waiting.async_ += 1
        try:
            return await self._acquire(deployment_id, deadline, priority, still_serving)
        finally:
            if priority == "sync":
                waiting.sync -= 1
            else:
                waiting.async_ -= 1

    async def _acquire(
        self,
        deployment_id: str,
        deadline: float,
        priority: Priority,
        still_serving: Callable[[], Awaitable[bool]] | None,
    ) -> Slot:
        assert self._changed is not None
        parked_reported = False
        next_check = time.monotonic() + SERVING_CHECK_S
        while True:
            slot = self._free_slot(deployment_id, priority)
            if slot is not None:
                slot.in_flight += 1
                if slot.handle is None:
                    try:
                        slot.handle = await asyncio.to_thread(self._handle, slot.actor_name)
                    except ValueError:  # the actor is gone: the controller will say so
                        slot.in_flight -= 1
                        slot.dead = True
                        continue
                return slot
            if not parked_reported and not self.slots.get(deployment_id):
                self.on_park(deployment_id)  # scale from zero: ask for a replica now
                parked_reported = True
            if still_serving is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + SERVING_CHECK_S
                if not await still_serving():
                    raise NotServing(deployment_id)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReplica(deployment_id)
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, SERVING_CHECK_S))
            except TimeoutError:
                pass

    def _free_slot(self, deployment_id: str, priority: Priority) -> Slot | None:
        if priority == "async" and self.waiting[deployment_id].sync > 0:
            # A sync request waits for a slot of this deployment: it goes first.
            return None
        candidates = [
            s
            for s in self.slots.get(deployment_id, {}).values()
            if not s.dead and s.in_flight < s.concurrency
        ]
        return min(candidates, key=lambda s: s.in_flight) if candidates else None

    async def release(self, slot: Slot, *, dead: bool = False) -> None:
        slot.in_flight -= 1
        if dead:
            slot.dead = True
        await self._notify()

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def _handle(self, actor_name: str) -> Any:
        import ray

        return ray.get_actor(actor_name, namespace=self.namespace)

    def in_flight(self, deployment_id: str) -> int:
        return sum(s.in_flight for s in self.slots.get(deployment_id, {}).values())

    def queued(self, deployment_id: str) -> int:
        waiting = self.waiting.get(deployment_id)
        return waiting.sync + waiting.async_ if waiting else 0
