"""A sampler lives as long as its session: ending it releases the engine, evented, and refuses
its requests from then on (real stack)."""

from __future__ import annotations

import time

import pytest

from api.kafka_driver import Driver
from events.audit import history
from events.envelope import EventEnvelope


def wait_for_event(driver: Driver, aggregate_id: str, type_: str) -> EventEnvelope:
    while True:  # bounded by the test's timeout
        found = [e for e in history(driver.settings, aggregate_id) if e.type == type_]
        if found:
            return found[0]
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_ending_a_session_releases_its_sampler_engine_and_refuses_its_requests(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, session_id, _, sampler_id = loop
    request = {"prompt": "ab", "max_tokens": 2}
    driver.ok("sampler-requests", "Sample", sampler_id, request)  # the worker hosts it now

    driver.ok("commands", "EndSession", session_id, {"reason": "done"})
    released = wait_for_event(driver, sampler_id, "SamplerReleased").payload
    assert released["reason"] == "session ended: done"
    assert released["engines_held"] >= 0

    refused = driver.call("sampler-requests", "Sample", sampler_id, request)
    assert refused["status"] == "rejected", refused
    assert f"sampler {sampler_id} is stopped" in refused["reason"]
    assert refused["field"] == "sampler_id"
