"""Checkpoint expiry, keep-last retention and deletion remove the objects from the store."""

from __future__ import annotations

import time

import pytest

from api.kafka_driver import Driver, datum, query
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from infra.s3 import ObjectStore


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
