"""Checkpoint expiry, keep-last retention and deletion remove the objects from the store, and
leave every link of a delta chain that a live checkpoint or the sampler still needs."""

from __future__ import annotations

import time
import uuid

import pytest

from api.kafka_driver import Driver, NotAccepted, datum, query, wait_for_result
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.s3 import ObjectStore
from infra.settings import Settings


def wait_until_deleted(driver: Driver, uri: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = query(driver.settings, "select * from {schema}.checkpoints where uri = %s", uri)
        if rows and rows[0]["status"] == "deleted":
            return rows[0]
        time.sleep(0.1)
    raise TimeoutError(f"{uri} not deleted in {timeout_s}s")


def objects_gone(driver: Driver, uri: str, timeout_s: float = 30) -> bool:
    store = CheckpointStore(ObjectStore.from_settings(driver.settings))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not list(store.store.list(store.prefix(CheckpointRef.from_uri(uri)))):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(120)
def test_expired_and_deleted_checkpoints_lose_their_objects(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, session_id, run_id, _ = loop
    driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum([1, 2, 3])]})
    short = driver.ok("trainer-requests", "SaveWeights", run_id,
                      {"name": "short-lived", "kind": "weights", "ttl_seconds": 1})  # fmt: skip
    kept = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": "kept"})

    row = wait_until_deleted(driver, short["path"])
    assert row["delete_reason"] == "expired"
    assert objects_gone(driver, short["path"])

    driver.ok("commands", "DeleteCheckpoint", session_id, {"checkpoint_id": kept["checkpoint_id"]})
    assert wait_until_deleted(driver, kept["path"])["delete_reason"] == "deleted"
    assert objects_gone(driver, kept["path"])


def wait_until_recorded(driver: Driver, uri: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = query(driver.settings, "select * from {schema}.checkpoints where uri = %s", uri)
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise TimeoutError(f"{uri} not recorded in {timeout_s}s")


def statuses(driver: Driver, run_id: str) -> dict[str, tuple[str, str | None]]:
    rows = query(driver.settings, "select name, status, delete_reason from {schema}.checkpoints "
                 "where run_id = %s", run_id)  # fmt: skip
    return {row["name"]: (row["status"], row["delete_reason"]) for row in rows}


@pytest.mark.timeout(240)
def test_a_delta_chain_outlives_retention_and_ttl_while_its_deltas_live_and_a_new_base_frees_it(
    services: Settings,
) -> None:
    driver = Driver(services)
    session_id, run_id, sampler_id = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("s", "r", "p"))
    driver.ok("commands", "CreateSession", session_id, {"base_model": "loopstream/tiny-llama"})
    driver.ok("commands", "CreateRun", session_id, {"run_id": run_id, "sampler_id": sampler_id,
              "max_seq_len": 64, "keep_last_checkpoints": 2})  # fmt: skip
    while not query(services, "select 1 from {schema}.samplers where sampler_id = %s", sampler_id):
        time.sleep(0.05)

    def train_and_save(name: str, **save: object) -> dict:
        driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum([1, 2, 3, 4])]})
        driver.ok("trainer-requests", "OptimStep", run_id, {})
        saved = driver.ok("trainer-requests", "SaveWeights", run_id, {"name": name, **save})
        wait_until_recorded(driver, saved["path"])
        return saved

    # A base and three deltas, all synced to the sampler; the first three expire after 1 s.
    chain = [train_and_save("c0", ttl_seconds=1)]
    chain += [train_and_save(f"d{i}", checkpoint_type="delta", ttl_seconds=1) for i in (1, 2)]
    chain.append(train_and_save("d3", checkpoint_type="delta"))
    for saved in chain[:3]:
        expiry = wait_for_result(services, f"expire-{saved['checkpoint_id']}")
        assert expiry["status"] == "rejected" and "is not expired" in expiry["reason"], expiry
    # keep_last_checkpoints=2 deleted nothing either: d3 needs d2, d1 and c0.
    assert statuses(driver, run_id) == {n: ("active", None) for n in ("c0", "d1", "d2", "d3")}
    # The whole chain is still in the store: pinning d2 walks d2 -> d1 -> c0.
    pin = {"prompt": "ab", "max_tokens": 2, "checkpoint_uri": chain[2]["path"]}
    pinned = driver.ok("sampler-requests", "Sample", sampler_id, pin)
    assert pinned["weights_version"]["digest"] == chain[2]["content_digest"]
    with pytest.raises(NotAccepted, match="delete those first"):  # nor may a user break it
        driver.ok("commands", "DeleteCheckpoint", session_id,
                  {"checkpoint_id": chain[0]["checkpoint_id"]})  # fmt: skip

    # A new base: the sampler moves to it, retention collects the old chain from its tail, and
    # the janitor asks again for the base that was refused: now it expires.
    base = train_and_save("b0")
    for saved in chain[:0:-1]:  # d3, d2, d1
        assert wait_until_deleted(driver, saved["path"])["delete_reason"] == "retention"
    assert wait_until_deleted(driver, chain[0]["path"])["delete_reason"] == "expired"
    assert all(objects_gone(driver, saved["path"]) for saved in chain)
    assert statuses(driver, run_id)["b0"] == ("active", None)
    served = driver.ok("sampler-requests", "Sample", sampler_id, {"prompt": "ab", "max_tokens": 2})
    assert served["weights_version"]["digest"] == base["content_digest"]
