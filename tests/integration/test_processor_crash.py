"""Kill the command processor in the middle of a transaction; nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict

import pytest
from confluent_kafka import Consumer, TopicPartition

from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from commands.processor import CommandProcessor
from infra.settings import REPO_ROOT, Settings
from tests.integration.kafka_helpers import (
    command,
    isolated_settings,
    read_events,
    read_results,
    running_processor,
    wait_for_results,
)

FILES = [{"relative_file_name": "model.safetensors", "size_bytes": 1, "sha256": "d" * 64}]


def session_script(sid: str) -> list[CommandEnvelope]:
    return [
        command("CreateSession", sid, {"base_model": "tiny"}),
        command(
            "CreateRun", sid, {"run_id": f"r-{sid}", "sampler_id": f"p-{sid}", "max_seq_len": 64}
        ),
        *[
            command(
                "RecordCheckpoint",
                sid,
                {"run_id": f"r-{sid}", "checkpoint_id": f"c{i}-{sid}", "name": f"step-{i}",
                 "kind": "sampler_weights", "files": FILES, "step": i},
            )
            for i in range(3)
        ],
        command("EndSession", sid),
    ]  # fmt: skip


def start_processor(settings: Settings, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "LOOPSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "LOOPSTREAM_PROCESSOR_INSTANCE_ID": f"crash-{settings.topic_prefix}",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "commands.processor"],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def count_uncommitted_log(settings: Settings) -> int:
    """Events in the log including those of open transactions (read_uncommitted)."""
    topic = settings.topic("events")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "count",
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
    count, eof = 0, set()
    deadline = time.monotonic() + 20
    while len(eof) < 3 and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=0.5):
            if message.error():
                eof.add(message.partition())
            else:
                count += 1
    consumer.close()
    return count


@pytest.mark.timeout(240)
def test_kill_mid_transaction_then_restart_gives_each_commands_events_exactly_once(
    settings: Settings,
) -> None:
    s = isolated_settings(settings)
    sessions = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
    commands = [c for sid in sessions for c in session_script(sid)]
    CommandBus(s).send_many(commands)

    # Slow commits and small batches, so the kill lands inside an open transaction.
    victim = start_processor(
        s, LOOPSTREAM_PROCESSOR_COMMIT_DELAY_MS="400", LOOPSTREAM_PROCESSOR_BATCH_SIZE="20"
    )
    try:
        deadline = time.monotonic() + 60
        while not read_results(s) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_results(s), "the processor committed nothing before the kill"
        time.sleep(0.2)  # into the next batch's 400 ms window between produce and commit
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        # Proof that a transaction was open: the log holds more events than the committed
        # results account for (events and results are committed together).
        committed = read_results(s)
        assert count_uncommitted_log(s) > sum(len(r.events) for r in committed.values())
        assert len(committed) < len(commands)

        survivor = start_processor(s)
        results = wait_for_results(s, [c.command_id for c in commands], timeout_s=120)
    finally:
        for proc in (victim, locals().get("survivor")):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)

    assert {r.status for r in results.values()} == {"accepted"}
    events = read_events(s)
    per_command = Counter(e.command_id for e in events)
    for c in commands:
        assert per_command[c.command_id] == len(results[c.command_id].events), c.type
    assert len({e.event_id for e in events}) == len(events)
    sequences = defaultdict(list)
    for e in events:
        sequences[e.aggregate_id].append(e.sequence)
    for sid in sessions:
        # create 1, run 2, three sampler checkpoints 2 each (saved + ready), end 3: gap-free
        assert sequences[sid] == list(range(1, 13)), sid


def test_state_rebuilt_after_restart_equals_state_before(settings: Settings) -> None:
    s = isolated_settings(settings)
    sessions = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    commands = [c for sid in sessions for c in session_script(sid)[:-1]]  # leave them active
    with running_processor(s) as before:
        CommandBus(s).send_many(commands)
        wait_for_results(s, [c.command_id for c in commands])
        states_before = {p: dict(state.states) for p, state in before.partitions.items()}
        seen_before = {p: set(state.seen) for p, state in before.partitions.items()}

    after = CommandProcessor(s)
    try:
        for partition in states_before:
            rebuilt = after.rebuild_partition(partition)
            assert rebuilt.states == states_before[partition]
            assert set(rebuilt.seen) == seen_before[partition]
    finally:
        after.loop.close()
    assert sum(len(states) for states in states_before.values()) == len(sessions)
