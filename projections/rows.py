"""Row changes: what a projector asks of a read model, before any SQL is involved.

A projector turns one event into `RowChange`s (pure, unit-tested). A batch of changes is merged
per row first, so the database sees each row at most once per statement (PostgreSQL refuses an
`ON CONFLICT DO UPDATE` that touches a row twice) and a batch of a thousand events on one session
costs one row write, not a thousand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from events.envelope import EventEnvelope


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]  # in table order, key and version included
    # Insert-only tables (event_log, command_results) keep the first row written for a key: the
    # same event or result seen again is the same fact, so there is nothing to update.
    insert_only: bool = False
    json_columns: frozenset[str] = frozenset()
    # Of those, the `json` (not `jsonb`) columns: PostgreSQL keeps their text as sent, so they
    # must be serialised exactly as before (pydantic-core); `jsonb` normalises any JSON text.
    json_text_columns: frozenset[str] = frozenset()


class RowChange(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: replay creates millions, this is ~3x cheaper."""

    table: str
    key: tuple[Any, ...]
    # The aggregate sequence of the event behind the change: upserts only win against a lower
    # stored version, which makes applying an event twice harmless.
    version: int
    values: Mapping[str, Any]  # the columns to set, key columns included
    # True: the change carries a whole row (insert it, or update a row of lower version).
    # False: it only updates some columns of a row an earlier event created.
    creates: bool = False


def entity_change(
    table: str, key: str, envelope: EventEnvelope, values: dict[str, Any], *, creates: bool
) -> RowChange:
    """A change to an entity row keyed by one id, versioned by the event's sequence and stamped
    with its time (every entity table has `version` and `updated_at`)."""
    return RowChange(
        table=table,
        key=(key,),
        version=envelope.sequence,
        creates=creates,
        values={**values, "version": envelope.sequence, "updated_at": envelope.occurred_at},
    )


def merge_changes(changes: Iterable[RowChange], tables: Mapping[str, TableSpec]) -> list[RowChange]:
    """Fold a batch's changes into one change per row, in arrival order."""
    merged: dict[tuple[str, tuple[Any, ...]], RowChange] = {}
    for change in changes:
        slot = (change.table, change.key)
        previous = merged.get(slot)
        if previous is None:
            merged[slot] = change
        elif tables[change.table].insert_only or change.version < previous.version:
            continue  # the first fact stands / an older event replayed inside the batch
        else:
            merged[slot] = RowChange(
                table=change.table,
                key=change.key,
                version=change.version,
                values={**previous.values, **change.values},
                creates=previous.creates or change.creates,
            )
    return list(merged.values())


def group_for_write(
    changes: Iterable[RowChange], tables: Mapping[str, TableSpec]
) -> dict[tuple[str, bool, tuple[str, ...]], list[tuple[Any, ...]]]:
    """Changes grouped by (table, creates, columns): one COPY and one statement per group.

    Groups are ordered creates first, so an update never runs before the insert it needs.
    """
    groups: dict[tuple[str, bool, tuple[str, ...]], list[tuple[Any, ...]]] = {}
    # A projector always sets the same columns for one kind of change: compute each column list
    # once per batch, not once per row.
    layouts: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
    for change in changes:
        values = change.values
        layout_key = (change.table, tuple(values))
        columns = layouts.get(layout_key)
        if columns is None:
            columns = tuple(c for c in tables[change.table].columns if c in values)
            layouts[layout_key] = columns
        groups.setdefault((change.table, change.creates, columns), []).append(
            tuple([values[c] for c in columns])
        )
    return dict(sorted(groups.items(), key=lambda item: (not item[0][1], item[0][0])))
