"""Delta chains of sampler checkpoints, as the session aggregate sees them (pure).

A trainer's sampler saves form chains: a `base` (position 0), then `delta`s, each against the
trainer's chain head, which is the run's previous sampler save. So a delta's parent is derived
from the order of the run's sampler saves and their `chain_position`, with no extra field on
`CheckpointSaved`: the newest earlier save of the run at position p - 1 (normally the one just
before). A delta is useless without every link back to its base, so a checkpoint that a live
checkpoint's chain goes through is *needed*: expiry and retention leave it, and a user is told
which checkpoints depend on it. Works on any objects with the attributes of `Link`, so the
aggregate's state type stays where it is (commands/loops.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol


class Link(Protocol):
    checkpoint_id: str
    run_id: str
    kind: str
    deleted: bool
    checkpoint_type: str | None  # None: saved before chains existed, a base
    chain_position: int | None


def parents(saved_in_order: Iterable[Link]) -> dict[str, str]:
    """delta checkpoint id -> its parent's id, for every delta whose parent is known."""
    parent: dict[str, str] = {}
    by_run: dict[str, list[Link]] = {}  # the run's sampler saves so far, oldest first
    for checkpoint in saved_in_order:
        if checkpoint.kind != "sampler_weights":
            continue
        earlier = by_run.setdefault(checkpoint.run_id, [])
        position = checkpoint.chain_position or 0
        if checkpoint.checkpoint_type == "delta" and position > 0:
            # The save just before, unless a save the trainer did not chain on sits between.
            for candidate in reversed(earlier):
                if (candidate.chain_position or 0) == position - 1:
                    parent[checkpoint.checkpoint_id] = candidate.checkpoint_id
                    break
        earlier.append(checkpoint)
    return parent


def needed(
    saved_in_order: Iterable[Link], *, keep: Collection[str] = (), gone: Collection[str] = ()
) -> set[str]:
    """Ids of checkpoints that some chain still needs: every link (parent, grandparent, ... base)
    of a live checkpoint, plus the checkpoints in `keep` (e.g. what a sampler serves) and their
    links. `gone` are treated as deleted (deletions being decided now)."""
    ordered = list(saved_in_order)
    parent = parents(ordered)
    result = set(keep)
    # A parent is always saved before its child: one pass from the newest marks whole chains.
    for checkpoint in reversed(ordered):
        cid = checkpoint.checkpoint_id
        alive = not checkpoint.deleted and cid not in gone
        if (alive or cid in result) and cid in parent:
            result.add(parent[cid])
    return result


def dependents(saved_in_order: Iterable[Link], checkpoint_id: str) -> list[str]:
    """Live checkpoints whose chain goes through `checkpoint_id` (later deltas), oldest first."""
    ordered = list(saved_in_order)
    parent = parents(ordered)
    through = {checkpoint_id}
    found = []
    for checkpoint in ordered:  # children come after their parents
        if parent.get(checkpoint.checkpoint_id) in through:
            through.add(checkpoint.checkpoint_id)
            if not checkpoint.deleted:
                found.append(checkpoint.checkpoint_id)
    return found
