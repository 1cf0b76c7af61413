"""The read model against the log itself: per aggregate, the events the log holds vs those applied.

A replay rebuilds with the same projectors as the live runner, so a record both skip makes
shadow and live agree while both differ from the log; comparing them proves little. This check
reads the events topic with no projector at all (one JSON parse per record, for the envelope's
ids) and compares, per aggregate:

- the number of distinct events (by `event_id`; a record that is not even JSON counts as one
  event of the aggregate its Kafka key names, which no read model can hold);
- the last `sequence`;
- an order-independent checksum over `event_id:sequence` (the sum of a 60-bit slice of each
  md5, modulo 2**64: the same as `replay.table_checksum`'s), so the same count of different
  events still differs;

with the same figures of `event_log`, the table that holds one row per applied event. An event's
`event_log` row and its entity rows are written together (one statement set per batch, or one
savepoint per record when PostgreSQL refuses the batch), so that row is the proof the event was
applied. Both sides stop at the projection's stored positions, taken once at the start: the
runner may keep going meanwhile without making the two sides disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from confluent_kafka import Consumer
from sqlalchemy import Engine, text

from events.envelope import DEFAULT_WORKSPACE
from infra.settings import Settings, checked_identifier
from projections.db import get_engine
from projections.failures import readable_fields
from projections.names import topics_for
from projections.pipeline import SourceRecord
from projections.pipeline import TopicPartition as TP
from projections.replay import partitions_of, read_batches, read_consumer
from projections.store import positions_of

_MOD = 1 << 64


def event_checksum(event_id: str, sequence: int | None) -> int:
    """One event's share of an aggregate's checksum (PostgreSQL computes the same in SQL)."""
    digest = hashlib.md5(f"{event_id}:{'' if sequence is None else sequence}".encode())
    return int(digest.hexdigest()[:15], 16)


@dataclass(frozen=True, slots=True)
class AggregateTally:
    events: int
    last_sequence: int | None
    checksum: int  # modulo 2**64


@dataclass
class LogTally:
    """Accumulates the log's side, record by record (pure: records in, tallies out)."""

    _seen: dict[str, set[str]] = field(default_factory=dict)
    _last: dict[str, int | None] = field(default_factory=dict)
    _sums: dict[str, int] = field(default_factory=dict)
    records: int = 0
    # Only events of this workspace (None: all). A record without a readable envelope names
    # no workspace, so a workspace's check leaves it out.
    workspace: str | None = None

    def add(self, record: SourceRecord) -> None:
        self.records += 1
        if self.workspace is not None and workspace_of(record) != self.workspace:
            return
        aggregate, event_id, sequence = log_entry(record)
        seen = self._seen.setdefault(aggregate, set())
        if event_id in seen:
            return  # the same event written twice: event_log keeps one row too
        seen.add(event_id)
        self._sums[aggregate] = (
            self._sums.get(aggregate, 0) + event_checksum(event_id, sequence)
        ) % _MOD
        last = self._last.get(aggregate)
        if sequence is not None and (last is None or sequence > last):
            self._last[aggregate] = sequence
        else:
            self._last.setdefault(aggregate, None)

    def tallies(self) -> dict[str, AggregateTally]:
        return {
            aggregate: AggregateTally(len(ids), self._last.get(aggregate), self._sums[aggregate])
            for aggregate, ids in self._seen.items()
        }


def workspace_of(record: SourceRecord) -> str | None:
    """The workspace an events-topic record names (events before tenancy: the default one);
    None when the record is not a readable envelope."""
    fields = readable_fields(record.value)
    if not isinstance(fields.get("event_id"), str):
        return None
    workspace = fields.get("workspace_id")
    return workspace if isinstance(workspace, str) else DEFAULT_WORKSPACE


def log_entry(record: SourceRecord) -> tuple[str, str, int | None]:
    """(aggregate id, event identity, sequence) of one events-topic record, as far as readable.

    An envelope names its aggregate and event; anything less (not JSON, no ids) is identified by
    its place in the log and belongs to the aggregate its Kafka key names (events are keyed by
    aggregate id), so the mismatch it causes still names an aggregate.
    """
    place = f"{record.topic}[{record.partition}]@{record.offset}"
    fields = readable_fields(record.value)
    aggregate_id, event_id = fields.get("aggregate_id"), fields.get("event_id")
    sequence = fields.get("sequence")
    if isinstance(sequence, float) and sequence.is_integer():
        sequence = int(sequence)  # 3.0 validates as 3 in the envelope: the same event
    if isinstance(aggregate_id, str) and isinstance(event_id, str):
        return aggregate_id, event_id, sequence if type(sequence) is int else None
    key = record.key.decode("utf-8", "replace") if record.key else f"<no key at {place}>"
    return key, place, None


@dataclass(frozen=True, slots=True)
class AggregateMismatch:
    aggregate_id: str
    log: AggregateTally | None
    read_model: AggregateTally | None

    @property
    def missing(self) -> int:
        """Events of the log the read model lacks (negative: it holds more than the log)."""
        return (self.log.events if self.log else 0) - (
            self.read_model.events if self.read_model else 0
        )


def compare_tallies(
    log: Mapping[str, AggregateTally], read_model: Mapping[str, AggregateTally]
) -> list[AggregateMismatch]:
    """Every aggregate whose events differ, most events missing first."""
    mismatches = [
        AggregateMismatch(aggregate, log.get(aggregate), read_model.get(aggregate))
        for aggregate in log.keys() | read_model.keys()
        if log.get(aggregate) != read_model.get(aggregate)
    ]
    return sorted(mismatches, key=lambda m: (-abs(m.missing), m.aggregate_id))


@dataclass(frozen=True)
class LogCheck:
    projection: str
    cutoffs: dict[TP, int]  # per events partition: the check covers offsets below this
    records: int  # events-topic records read
    aggregates: int  # aggregates in the log
    mismatches: list[AggregateMismatch]

    @property
    def matches(self) -> bool:
        return not self.mismatches


# --- I/O ---------------------------------------------------------------------------------------

# The read model's side, per aggregate, over the rows of records below the cutoffs. Same
# checksum as `event_checksum`.
_READ_MODEL_SQL = """
select e.aggregate_id, count(*), max(e.sequence),
       coalesce(sum(('x' || left(md5(e.event_id || ':' || e.sequence::text), 15))::bit(60)::bigint),
                0)::text
from {schema}.event_log as e
join unnest(cast(:partitions as integer[]), cast(:cutoffs as bigint[])) as c(p, o)
  on e.kafka_partition = c.p and e.kafka_offset < c.o
where cast(:workspace as text) is null or coalesce(e.workspace_id, :default) = :workspace
group by e.aggregate_id
"""


def read_model_tallies(
    engine: Engine, schema: str, cutoffs: Mapping[int, int], *, workspace: str | None = None
) -> dict[str, AggregateTally]:
    partitions = sorted(cutoffs)
    with engine.connect() as conn:
        rows = conn.execute(
            text(_READ_MODEL_SQL.format(schema=checked_identifier(schema))),
            {
                "partitions": partitions,
                "cutoffs": [cutoffs[p] for p in partitions],
                "workspace": workspace,
                "default": DEFAULT_WORKSPACE,
            },
        ).all()
    return {
        aggregate: AggregateTally(int(count), last, int(total) % _MOD)
        for aggregate, count, last, total in rows
    }


def log_tallies(
    settings: Settings,
    cutoffs: Mapping[TP, int],
    *,
    timeout_s: float,
    workspace: str | None = None,
) -> LogTally:
    """Read the events partitions from offset 0 up to `cutoffs` and tally them."""
    tally = LogTally(workspace=workspace)
    pending = {tp for tp, end in cutoffs.items() if end > 0}
    if not pending:
        return tally
    starts = dict.fromkeys(pending, 0)
    consumer = read_consumer(settings, f"{settings.topic_prefix}.check", starts, pending)
    try:
        for records in read_batches(
            consumer,
            end_offsets=dict(cutoffs),
            pending=pending,
            reached=dict(starts),
            batch_size=10_000,
            timeout_s=timeout_s,
        ):
            for record in records:
                tally.add(record)
    finally:
        consumer.close()
    return tally


def check_against_log(
    settings: Settings,
    *,
    projection: str = "loops",
    timeout_s: float = 600.0,
    workspace: str | None = None,
) -> LogCheck:
    """Compare `projection`'s event_log with the events topic, up to its stored positions;
    with `workspace`, only that workspace's events on both sides."""
    engine = get_engine(settings)
    events = topics_for(settings).events
    stored = positions_of(engine, projection)  # first: both sides stop here
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "loopstream-check"}
    )
    try:
        partitions = partitions_of(consumer, [events])
    finally:
        consumer.close()
    cutoffs = {tp: stored.get(tp, 0) for tp in partitions}
    tally = log_tallies(settings, cutoffs, timeout_s=timeout_s, workspace=workspace)
    log = tally.tallies()
    read_model = read_model_tallies(
        engine, projection, {p: o for (_, p), o in cutoffs.items()}, workspace=workspace
    )
    return LogCheck(
        projection=projection,
        cutoffs=cutoffs,
        records=tally.records,
        aggregates=len(log),
        mismatches=compare_tallies(log, read_model),
    )
