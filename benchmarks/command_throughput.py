"""Command throughput vs raw confluent-kafka, on the same broker, in the same run.

Baseline: produce the same command bytes to a topic with a plain producer and consume them all
back with a plain consumer (no transactions, no decisions).
loopstream: send the commands with CommandBus, and let the command processor turn them into
events + results + committed offsets, exactly once, in Kafka transactions.

    .venv/bin/python benchmarks/command_throughput.py --commands 20000
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from commands.processor import CommandProcessor
from infra.settings import get_settings
from infra.topics import provision_topics

RESULTS = Path(__file__).parent / "results" / "command_throughput.json"
FILES = [{"relative_file_name": "model.safetensors", "size_bytes": 1, "sha256": "e" * 64}]


def workload(n: int) -> list[CommandEnvelope]:
    """Realistic mix: per session create, run, two checkpoints, end (5 commands)."""
    commands: list[CommandEnvelope] = []
    for i in range(n // 5):
        sid = f"bench-{i}"

        def c(type_: str, payload: dict, sid: str = sid) -> CommandEnvelope:
            return CommandEnvelope(
                command_id=str(uuid.uuid4()), type=type_, aggregate_id=sid, payload=payload
            )

        commands += [
            c("CreateSession", {"base_model": "tiny"}),
            c("CreateRun", {"run_id": f"r{i}", "sampler_id": f"p{i}", "max_seq_len": 64}),
            *[
                c("RecordCheckpoint", {"run_id": f"r{i}", "checkpoint_id": f"c{k}-{i}",
                                       "name": f"step-{k}", "kind": "sampler_weights",
                                       "files": FILES})
                for k in range(2)
            ],
            c("EndSession", {}),
        ]  # fmt: skip
    return commands


def raw_baseline(settings, payloads: list[tuple[bytes, bytes]]) -> float:
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result()
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5, "acks": "all",
         "enable.idempotence": True}
    )  # fmt: skip
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": topic,
         "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )  # fmt: skip
    consumer.subscribe([topic])
    consumer.consume(1, timeout=5)  # join the group before the clock starts
    started = time.perf_counter()
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()
    seen = 0
    while seen < len(payloads):
        seen += sum(1 for m in consumer.consume(1000, timeout=1) if not m.error())
    consumer.commit(asynchronous=False)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def loopstream_run(
    settings, commands: list[CommandEnvelope], batch_size: int
) -> tuple[float, dict]:
    isolated = settings.model_copy(
        update={"topic_prefix": f"bench-{uuid.uuid4().hex[:8]}", "processor_batch_size": batch_size}
    )
    provision_topics(isolated)
    processor = CommandProcessor(isolated)
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    while not processor.partitions:  # assigned and rebuilt before the clock starts
        time.sleep(0.05)
    started = time.perf_counter()
    CommandBus(isolated).send_many(commands, timeout_s=300)
    while processor.totals.commands < len(commands):
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    processor.stop_requested.set()
    thread.join(30)
    return elapsed, vars(processor.totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    settings = get_settings()
    commands = workload(args.commands)
    payloads = [(c.aggregate_id.encode(), c.to_bytes()) for c in commands]

    raw_s = raw_baseline(settings, payloads)
    loop_s, totals = loopstream_run(settings, commands, args.batch_size)
    n = len(commands)
    figures = {
        "commands": n,
        "batch_size": args.batch_size,
        "raw_produce_consume_per_s": round(n / raw_s),
        "loopstream_commands_per_s": round(n / loop_s),
        "loopstream_events_per_s": round(totals["events"] / loop_s),
        "ratio_loopstream_to_raw": round((n / loop_s) / (n / raw_s), 3),
        "accepted": totals["accepted"],
        "rejected": totals["rejected"],
        "events": totals["events"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    table = Table("measure", "value", title="command throughput (same broker, same run)")
    for key, value in figures.items():
        table.add_row(key, str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
