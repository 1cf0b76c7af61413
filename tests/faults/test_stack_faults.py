"""The stack's servers go away under a running RL loop: Kafka, PostgreSQL, the S3 store.

Each test runs the loop on the isolated services, stops one server of the isolated stack for
about ten seconds and starts it again. The loop must finish (calls may fail meanwhile, but only
with errors a client may retry, and a retry succeeds), nothing accepted is lost or doubled, and
the read models rebuilt from the log equal the live ones.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from infra.settings import Settings
from tests.faults.ledger import check_ledger
from tests.faults.loop import Background, Calls, RlLoop
from tests.isolated import IsolatedServices, IsolatedStack

DOWN_S = 10.0
# librdkafka's fatal error of a static consumer group member fenced by its own rejoin.
FENCED = "Static consumer fenced by other consumer with same group.instance.id"
STEPS = 5


def outage(stack: IsolatedStack, server: str, *, down_s: float = DOWN_S) -> dict[str, float]:
    """Stop `server`, keep it down `down_s` seconds, start it and wait until it is ready."""
    started = time.monotonic()
    stack.stop(server)
    stopped = time.monotonic()
    time.sleep(down_s)
    stack.start(server)
    return {
        "stop_s": round(stopped - started, 1),
        "down_s": round(time.monotonic() - stopped, 1),
    }


def record(figures: dict[str, Any], loop: RlLoop, calls: Calls, settings: Settings) -> None:
    ledger = check_ledger(settings, calls.accepted)
    figures.update(
        steps=len(loop.rewards),
        calls_accepted=len(calls.accepted),
        retried=dict(calls.retried),
        results_on_topic=ledger.results,
        events_on_topic=ledger.events,
        replayed_events=ledger.replayed_events,
        tables_equal=ledger.tables,
        aggregates_equal_to_log=ledger.aggregates,
    )


@pytest.mark.timeout(480)
def test_save_during_an_s3_outage_completes_once_the_store_is_back(
    fault_stack: IsolatedStack,
    services: IsolatedServices,
    calls: Calls,
    settings: Settings,
    figures: dict[str, Any],
) -> None:
    loop = RlLoop(calls).start()
    loop.step()  # the base save, and the sampler serves it

    # The next step samples and trains from memory, then saves while the store is down.
    fault_stack.stop("s3")
    stopped = time.monotonic()
    background = Background(loop, 2).start()
    while loop.phase != "save" and background.thread.is_alive():
        time.sleep(0.05)
    time.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped)))
    fault_stack.start("s3")
    figures["down_s"] = round(time.monotonic() - stopped, 1)
    background.join()

    assert len(loop.saved) == 3
    assert len({s["checkpoint_id"] for s in loop.saved}) == 3
    record(figures, loop, calls, settings)


@pytest.mark.timeout(480)
def test_rl_loop_finishes_through_a_kafka_broker_restart(
    fault_stack: IsolatedStack,
    services: IsolatedServices,
    calls: Calls,
    settings: Settings,
    figures: dict[str, Any],
) -> None:
    fenced_before = {name: services.log_count(name, FENCED) for name in services.names}
    loop = RlLoop(calls).start()
    background = Background(loop, STEPS).start()
    background.wait_for_steps(2)

    figures.update(outage(fault_stack, "kafka"))
    background.join()
    # A static member whose session ran out while the broker was away is fenced by its own
    # rejoin (librdkafka #3437), a fatal consumer error: the loop replaced such consumers.
    figures["fenced"] = [
        n for n in services.names if services.log_count(n, FENCED) > fenced_before[n]
    ]

    assert len(loop.rewards) == STEPS
    record(figures, loop, calls, settings)


@pytest.mark.timeout(480)
def test_rl_loop_finishes_through_a_postgres_restart(
    fault_stack: IsolatedStack,
    services: IsolatedServices,
    calls: Calls,
    settings: Settings,
    figures: dict[str, Any],
) -> None:
    calls.patience_s = 60.0  # PostgreSQL is back within seconds of the outage
    loop = RlLoop(calls).start()
    background = Background(loop, STEPS).start()
    background.wait_for_steps(2)

    figures.update(outage(fault_stack, "postgres"))
    background.join()

    assert len(loop.rewards) == STEPS
    record(figures, loop, calls, settings)
