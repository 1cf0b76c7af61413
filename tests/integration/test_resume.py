"""A run started from another run's full-state checkpoint continues it exactly."""

from __future__ import annotations

import time
import uuid

import pytest

from api.kafka_driver import Driver, datum, query


@pytest.mark.timeout(180)
def test_run_started_from_a_state_checkpoint_matches_the_original(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, _, run_a, _ = loop
    batch = {"data": [datum(list(b"resume me exactly")), datum(list(b"and this too"))]}
    adam = {"adam_params": {"learning_rate": 5e-3, "grad_clip_norm": 1.0}}
    for _ in range(2):
        driver.ok("trainer-requests", "ForwardBackward", run_a, batch)
        driver.ok("trainer-requests", "OptimStep", run_a, adam)
    state = driver.ok(
        "trainer-requests", "SaveWeights", run_a, {"name": "state-2", "kind": "weights"}
    )

    # A second session whose run starts from run A's state (weights and AdamW moments).
    session_b, run_b, sampler_b = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("s", "r", "p"))
    driver.ok("commands", "CreateSession", session_b, {"base_model": "loopstream/tiny-llama"})
    driver.ok("commands", "CreateRun", session_b, {"run_id": run_b, "sampler_id": sampler_b,
              "max_seq_len": 64, "from_checkpoint": state["path"]})  # fmt: skip
    for _ in range(200):  # the trainer finds runs in the read model
        if query(driver.settings, "select 1 from {schema}.runs where run_id = %s", run_b):
            break
        time.sleep(0.05)

    losses = {}
    for run in (run_a, run_b):
        steps = []
        for _ in range(2):
            steps.append(driver.ok("trainer-requests", "ForwardBackward", run, batch)["loss"])
            optim = driver.ok("trainer-requests", "OptimStep", run, adam)
        steps.append(optim["step"])
        losses[run] = steps
    # Same weights, same optimizer state, same step counter: bit-identical continuation.
    assert losses[run_b] == losses[run_a]
    assert losses[run_a][-1] == 4
