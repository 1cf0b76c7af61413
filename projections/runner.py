"""The projection runner: a faust-streaming app that keeps the Loops read models up to date.

    python -m projections.runner [--projection loops] [--batch-size 2000] [--within 0.01]

How it stays exactly-once into PostgreSQL although faust's own guarantees do not hold
(DESIGN.md, "Known pitfalls"):
- one agent, concurrency 1, over both source topics (events, command-results);
- `stream.take_events(n, within=t)`: each batch is one PostgreSQL transaction holding the rows
  and the batch's `(topic, partition, next_offset)` in `projection_positions`;
- Kafka's committed group offsets are ignored: faust's "seek to committed" (run after every
  assignment) is replaced by a seek to the positions stored in PostgreSQL;
- faust reads uncommitted data unless exactly_once is on, so the consumer is switched to
  `read_committed` here (aborted command-processor transactions must never be projected);
- a record that cannot be applied (undecodable, a projector that raises, rows PostgreSQL refuses)
  is dead-lettered AND recorded in `<schema>.projection_failures` in the batch's transaction; the
  batch's other records are applied (a savepoint per record once PostgreSQL refuses the batch);
- an agent that raises still acks in faust, and records buffered ahead of a failed batch would be
  applied past the gap, so any unexpected error (or a position moved by another writer) ends the
  process with `EXIT_RESYNC`: the restarted process resumes from PostgreSQL (crash-only).
  `loopstream projections run` restarts it; run it under any supervisor otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from confluent_kafka import Producer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from infra.settings import Settings, get_settings
from projections.db import get_engine
from projections.names import group_id, topics_for
from projections.pipeline import (
    DeadLetter,
    SourceRecord,
    TopicPartition,
    dead_letter_headers,
    plan_batch,
    relax_gc,
)
from projections.store import ReadModelWriter

log = logging.getLogger("loopstream.projections")

# sysexits' EX_TEMPFAIL: "try again", which is what a supervisor should do.
EXIT_RESYNC = 75


@dataclass(frozen=True)
class RunnerConfig:
    projection: str = "loops"  # also the name of its PostgreSQL schema
    batch_size: int = 2000  # events per PostgreSQL transaction, at most
    # How long a partial batch waits for more events before it is applied: the latency floor of
    # every future the API long-polls, so short; under load batches fill long before it.
    within_s: float = 0.01
    # Consumer-group liveness: a kill -9'd runner's partitions are reassigned after this.
    session_timeout_s: float = 10.0
    # Fault injection for the crash tests: sleep inside each open transaction, before COMMIT.
    pause_before_commit_s: float = 0.0
    # Behind its topics with stored positions that have not moved for this long: the process
    # ends (EXIT_RESYNC) and its successor resumes from PostgreSQL (see StallWatchdog).
    stall_s: float = 60.0


class ProjectionProcessor:
    """The synchronous core: positions, planning, dead letters, one transaction per batch."""

    def __init__(self, settings: Settings, config: RunnerConfig) -> None:
        self.config = config
        self.topics = topics_for(settings)
        self.writer = ReadModelWriter(get_engine(settings), projection=config.projection)
        self.dlq_topic = settings.topic("events.dlq")
        self.dlq = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "enable.idempotence": True,
                "linger.ms": 5,
            }
        )
        self._lock = threading.Lock()
        self.positions: dict[TopicPartition, int] = {}
        self.applied = 0
        self.dead_lettered = 0

    def resume_positions(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Where to read each newly assigned partition from: PostgreSQL, 0 if never read."""
        assigned = list(assigned)
        stored = self.writer.load_positions(sorted({topic for topic, _ in assigned}))
        with self._lock:
            self.positions = {tp: stored.get(tp, 0) for tp in assigned}
            return dict(self.positions)

    def process(self, records: Sequence[SourceRecord]) -> None:
        with self._lock:
            expected = dict(self.positions)
        batch = plan_batch(records, self.topics, positions=expected)
        before_commit = self._pause if self.config.pause_before_commit_s > 0 else None
        skipped = self.writer.apply(
            batch,
            expected=expected,
            dead_letter_sink=self.send_dead_letters,
            before_commit=before_commit,
        )
        with self._lock:
            self.positions.update(batch.next_offsets)
        self.applied += len(batch) - len(skipped)

    def send_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in letters:
            log.warning(
                "dead-lettering %s[%d]@%d: %s: %s",
                letter.record.topic,
                letter.record.partition,
                letter.record.offset,
                letter.error_type,
                letter.reason,
            )
            self.dlq.produce(
                self.dlq_topic,
                key=letter.record.key,
                value=letter.record.value,
                headers=dead_letter_headers(letter, projection=self.config.projection),
                on_delivery=delivered,
            )
        remaining = self.dlq.flush(30)
        if remaining or failures:
            # Raising keeps the batch uncommitted: it is retried after the restart.
            raise RuntimeError(f"dead letters not delivered: {failures or remaining}")
        self.dead_lettered += len(letters)

    def _pause(self) -> None:
        time.sleep(self.config.pause_before_commit_s)


# --- faust plumbing ----------------------------------------------------------------------------


class _ReadCommittedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust asks aiokafka for read_committed only under exactly_once, which we do not use
        # (see the module docstring); aiokafka reads this attribute when the consumer starts.
        consumer._isolation_level = "read_committed"
        return consumer


class _PositionedConsumer(faust_aiokafka.Consumer):
    """A faust consumer whose "committed offsets" are the projection's PostgreSQL positions."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        processor: ProjectionProcessor = self.app.projection_processor  # type: ignore[attr-defined]
        assigned = {TP(tp.topic, tp.partition) for tp in self.assignment()}
        positions = await asyncio.to_thread(
            processor.resume_positions, [(tp.topic, tp.partition) for tp in assigned]
        )
        offsets = {TP(topic, partition): offset for (topic, partition), offset in positions.items()}
        if offsets:
            log.info("resuming from PostgreSQL positions %s", _fmt(positions))
            await self.seek_wait(offsets)
        return offsets


class _Transport(faust_aiokafka.Transport):
    Consumer = _PositionedConsumer


class ProjectionApp(faust.App):
    projection_processor: ProjectionProcessor

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def build_app(settings: Settings, config: RunnerConfig) -> ProjectionApp:
    brokers = ";".join(f"kafka://{host}" for host in settings.kafka_bootstrap_servers.split(","))
    data_dir = settings.data_dir / "projections"
    data_dir.mkdir(parents=True, exist_ok=True)  # faust makes only the last level
    app = ProjectionApp(
        group_id(settings, config.projection),
        broker=brokers,
        autodiscover=False,
        web_enabled=False,
        store="memory://",
        # faust keeps a data dir even with in-memory tables; the default is in the cwd.
        datadir=str(data_dir / "{conf.name}-data"),
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics belong to infra/topics.py
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=max(config.session_timeout_s / 4, 0.5),
        stream_buffer_maxsize=max(4096, 2 * config.batch_size),
        processing_guarantee="at_least_once",
    )
    processor = ProjectionProcessor(settings, config)
    app.projection_processor = processor
    topics = topics_for(settings)
    source = app.topic(topics.events, topics.command_results, key_type=bytes, value_type=bytes)

    @app.agent(source, concurrency=1, name="loops-projection")
    async def project(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(config.batch_size, within=config.within_s):
            records = [_record(event.message) for event in events]
            try:
                await asyncio.to_thread(processor.process, records)
            except BaseException:
                log.exception("projection batch failed; exiting to resume from PostgreSQL")
                logging.shutdown()
                # Not a graceful stop: faust would ack and go on with the records behind.
                os._exit(EXIT_RESYNC)

    return app


def _record(message: Any) -> SourceRecord:
    headers = message.headers or ()
    if isinstance(headers, Mapping):
        headers = headers.items()
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple((str(k), bytes(v or b"")) for k, v in headers),
        # faust gives seconds as a float; the log (and replay) has integer milliseconds.
        timestamp_ms=round(message.timestamp * 1000) if message.timestamp is not None else None,
    )


def _fmt(positions: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(positions.items()))


class StallWatchdog(threading.Thread):
    """Ends the process when the projection is behind its topics and its stored positions
    have not moved for `stall_s`.

    After a broker restart faust/aiokafka can stay up, connected and silent, consuming nothing
    (faust #596): the read models would freeze with nothing in the log. A new process resumes
    from the positions in PostgreSQL, so ending this one loses nothing. A thread, not a faust
    timer: a stuck event loop must not silence its own watchdog.
    """

    def __init__(self, settings: Settings, config: RunnerConfig, *, check_s: float = 5.0) -> None:
        super().__init__(name="stall-watchdog", daemon=True)
        self.settings = settings
        self.config = config
        self.check_s = check_s

    def run(self) -> None:
        from projections.health import end_offsets, total_lag
        from projections.store import positions_of

        engine = get_engine(self.settings)
        last: dict[TopicPartition, int] | None = None
        moved_at = time.monotonic()
        while True:
            time.sleep(self.check_s)
            try:
                positions = positions_of(engine, self.config.projection)
                lag = total_lag(end_offsets(self.settings), positions)
            except Exception:  # Kafka or PostgreSQL away: nothing to judge by
                continue
            if lag == 0 or positions != last:
                last, moved_at = positions, time.monotonic()
                continue
            stalled_s = time.monotonic() - moved_at
            if stalled_s >= self.config.stall_s:
                log.error(
                    "projection stalled: behind its topics and no progress; exiting to resume "
                    "from PostgreSQL",
                    extra={"lag": lag, "stalled_s": round(stalled_s, 1)},
                )
                logging.shutdown()
                os._exit(EXIT_RESYNC)


def run(settings: Settings, config: RunnerConfig, *, loglevel: str = "info") -> None:
    relax_gc()
    StallWatchdog(settings, config).start()
    app = build_app(settings, config)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=True)
    worker.execute_from_commandline()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projection", default=RunnerConfig.projection)
    parser.add_argument("--batch-size", type=int, default=RunnerConfig.batch_size)
    parser.add_argument("--within", type=float, default=RunnerConfig.within_s)
    parser.add_argument("--session-timeout", type=float, default=RunnerConfig.session_timeout_s)
    parser.add_argument("--pause-before-commit", type=float, default=0.0)
    parser.add_argument("--stall", type=float, default=RunnerConfig.stall_s)
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    config = RunnerConfig(
        projection=args.projection,
        batch_size=args.batch_size,
        within_s=args.within,
        session_timeout_s=args.session_timeout,
        pause_before_commit_s=args.pause_before_commit,
        stall_s=args.stall,
    )
    run(get_settings(), config, loglevel=args.loglevel)


if __name__ == "__main__":
    main(sys.argv[1:])
