"""Weight sync latency: save_weights_for_sampler -> WeightsLoaded, vs a raw copy of the bytes.

loopstream's path: the request goes to the trainer worker over Kafka, the trainer saves and
uploads the folder, records the checkpoint on the session (CheckpointSaved + WeightsReady), the
sampler worker sees WeightsReady between requests, downloads, verifies every sha256, swaps the
weights in place and emits WeightsLoaded. Baselines in the same run, on the same bytes: a local
file copy of the folder, and a raw S3 put + get of each file through the same store.

Needs the stack and services: `loopstream stack up && loopstream services up`.

    .venv/bin/python benchmarks/weight_sync.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_END, Consumer
from rich.console import Console
from rich.table import Table

from api.kafka_driver import Driver, new_loop
from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from events.envelope import EventEnvelope
from events.kafka_log import assign_all, consumer_config
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.s3 import ObjectStore
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "weight_sync.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def events_feed(settings) -> Consumer:  # type: ignore[no-untyped-def]
    topic = settings.topic("events")
    consumer = Consumer(consumer_config(settings, group_id=f"bench-sync-{uuid.uuid4().hex}"))
    assign_all(consumer, settings, topic, OFFSET_END)
    consumer.consume(1, timeout=1)  # settle the assignment before the clock starts
    return consumer


def wait_for_loaded(feed: Consumer, sampler_id: str, uri: str) -> float:
    while True:
        # Poll, then drain what already arrived: `consume(100, timeout)` alone waits out the whole
        # timeout unless 100 records come, which would add up to 50 ms to every sync measured.
        first = feed.poll(0.05)
        for message in ([first] if first is not None else []) + feed.consume(100, timeout=0):
            if (
                message.error()
                or dict(message.headers() or []).get("event_type") != b"WeightsLoaded"
            ):
                continue
            envelope = EventEnvelope.from_bytes(message.value())
            if envelope.aggregate_id == sampler_id and envelope.payload["uri"] == uri:
                return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    settings = get_settings()
    driver, _, run_id, sampler_id = new_loop(settings)
    store = CheckpointStore(ObjectStore.from_settings(settings))
    # Host the sampler first, so new weights arrive by WeightsReady, not on first use.
    driver.ok("sampler-requests", "Sample", sampler_id, {"prompt": "a", "max_tokens": 1})

    sync_ms, copy_ms, s3_ms = [], [], []
    feed = events_feed(settings)
    bus = CommandBus(settings)
    size = 0
    for i in range(args.rounds):
        request = CommandEnvelope(
            command_id=str(uuid.uuid4()), type="SaveWeights", aggregate_id=run_id,
            payload={"name": f"sync-{i}", "kind": "sampler_weights"},
        )  # fmt: skip
        uri = f"bt://loops:{run_id}/sampler_weights/sync-{i}"
        started = time.perf_counter()
        bus.send(request, to="trainer-requests")
        loaded_at = wait_for_loaded(feed, sampler_id, uri)
        sync_ms.append((loaded_at - started) * 1000)
        saved = driver_result(driver, request.command_id)

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ckpt"
            store.download(CheckpointRef.from_uri(saved["path"]), folder)
            size = sum(f.stat().st_size for f in folder.iterdir())
            t0 = time.perf_counter()
            shutil.copytree(folder, Path(tmp) / "copy")
            copy_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            for f in folder.iterdir():
                key = f"bench/raw/{uuid.uuid4().hex}/{f.name}"
                store.store.put_bytes(key, f.read_bytes())
                store.store.get_bytes(key)
            s3_ms.append((time.perf_counter() - t0) * 1000)

    figures = {
        "rounds": args.rounds,
        "checkpoint_bytes": size,
        "sync_ms_p50": round(statistics.median(sync_ms), 1),
        "sync_ms_p99": round(percentile(sync_ms, 0.99), 1),
        "raw_s3_put_get_ms_p50": round(statistics.median(s3_ms), 1),
        "local_copy_ms_p50": round(statistics.median(copy_ms), 2),
        "ratio_sync_to_raw_s3": round(statistics.median(sync_ms) / statistics.median(s3_ms), 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    table = Table(
        "measure", "value", title="weight sync: save_weights_for_sampler -> WeightsLoaded"
    )
    for key, value in figures.items():
        table.add_row(key, str(value))
    Console().print(table)


def driver_result(driver: Driver, request_id: str) -> dict:
    from api.kafka_driver import wait_for_result

    result = wait_for_result(driver.settings, request_id)
    assert result["status"] == "accepted", result
    return result["output"]


if __name__ == "__main__":
    main()
