"""Base/delta weight sync on the real stack: the sampler follows a delta chain bit for bit,
refuses a corrupted delta (HotloadFailed, old weights kept), and a new base recovers it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api.kafka_driver import Driver, datum
from events.audit import history
from events.envelope import EventEnvelope
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import DELTA_WEIGHTS_NAME
from infra.s3 import ObjectStore

TEXT = list(b"weights move in small steps")


def train_and_save(driver: Driver, run_id: str, name: str, **save: Any) -> dict[str, Any]:
    driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(TEXT)]})
    driver.ok("trainer-requests", "OptimStep", run_id, {"adam_params": {"learning_rate": 1e-4}})
    return driver.ok("trainer-requests", "SaveWeights", run_id, {"name": name, **save})


def sample(driver: Driver, sampler_id: str, **extra: Any) -> dict[str, Any]:
    payload = {"prompt_tokens": TEXT[:4], "max_tokens": 4, "seed": 1, **extra}
    return driver.ok("sampler-requests", "Sample", sampler_id, payload)["weights_version"]


def wait_for_event(driver: Driver, sampler_id: str, type_: str, uri: str) -> EventEnvelope:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for envelope in history(driver.settings, sampler_id):
            if envelope.type == type_ and envelope.payload.get("uri") == uri:
                return envelope
        time.sleep(0.1)
    raise AssertionError(f"no {type_} for {uri} on sampler {sampler_id}")


@pytest.mark.timeout(240)
def test_sampler_follows_a_delta_chain_and_refuses_a_corrupted_delta(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, _, run_id, sampler_id = loop
    base = train_and_save(driver, run_id, "c0")
    assert base["checkpoint_type"] == "base"
    # Syncs are applied between requests: a sample sent the moment the save answers may still
    # be served by the weights before it, so wait for the hotload (as for each delta below).
    wait_for_event(driver, sampler_id, "HotloadSucceeded", base["path"])
    assert sample(driver, sampler_id)["digest"] == base["content_digest"]  # sampler comes up on it

    # Three more saves: deltas, each hot-loaded between requests, digest for digest.
    deltas = []
    for i in range(1, 4):
        saved = train_and_save(driver, run_id, f"c{i}", checkpoint_type="delta")
        assert saved["checkpoint_type"] == "delta"
        ok = wait_for_event(driver, sampler_id, "HotloadSucceeded", saved["path"]).payload
        assert ok["checkpoint_type"] == "delta" and ok["content_digest"] == saved["content_digest"]
        assert ok["folders_applied"] == 1 and ok["total_ms"] >= ok["fetch_ms"] > 0
        deltas.append((saved, ok))
    assert sample(driver, sampler_id)["digest"] == deltas[-1][0]["content_digest"]
    base_ok = wait_for_event(driver, sampler_id, "HotloadSucceeded", base["path"]).payload
    assert all(ok["bytes_moved"] < base_ok["bytes_moved"] for _, ok in deltas)

    # Pin the sampler back on the base, then corrupt c1's delta in the store: the next save (c4,
    # a delta on c3) needs c3 -> c2 -> c1 fetched onto the base, and c1 does not check out.
    assert (
        sample(driver, sampler_id, checkpoint_uri=base["path"])["digest"] == base["content_digest"]
    )
    store = CheckpointStore(ObjectStore.from_settings(driver.settings))
    key = store.prefix(CheckpointRef.from_uri(deltas[0][0]["path"])) + DELTA_WEIGHTS_NAME
    data = bytearray(store.store.get_bytes(key))
    data[-1] ^= 0xFF
    store.store.put_bytes(key, bytes(data))

    c4 = train_and_save(driver, run_id, "c4", checkpoint_type="delta")
    failed = wait_for_event(driver, sampler_id, "HotloadFailed", c4["path"]).payload
    assert DELTA_WEIGHTS_NAME in failed["reason"] and "sha256" in failed["reason"]
    assert failed["serving_digest"] == base["content_digest"]
    # Still serving the pinned base: going back to c3, the newest sync that loaded, needs c1 too
    # and is refused as well (recorded as a load outside any sync), so the request stays on it.
    assert sample(driver, sampler_id)["digest"] == base["content_digest"]

    # A new base (what reset_delta_chain asks for) needs no chain: the sampler recovers.
    c5 = train_and_save(driver, run_id, "c5", checkpoint_type="base")
    assert c5["checkpoint_type"] == "base"
    wait_for_event(driver, sampler_id, "HotloadSucceeded", c5["path"])
    assert sample(driver, sampler_id)["digest"] == c5["content_digest"]
    events = history(driver.settings, sampler_id)
    types = [e.type for e in events]
    assert types.count("HotloadStarted") == types.count("HotloadSucceeded") + 2  # two refused
    refused = [(e.payload["uri"], e.payload["weights_version"]) for e in events
               if e.type == "HotloadFailed"]  # fmt: skip
    assert refused == [(c4["path"], 5), (deltas[-1][0]["path"], None)]
