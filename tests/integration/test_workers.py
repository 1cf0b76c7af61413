"""Trainer and sampler workers on the real stack, driven through Kafka as the API drives them."""

from __future__ import annotations

import math
import time

import pytest

from api.kafka_driver import Driver, datum, new_loop, query
from infra.settings import Settings


@pytest.mark.timeout(180)
def test_train_save_and_sample_the_new_weights(loop: tuple[Driver, str, str, str]) -> None:
    driver, _, run_id, sampler_id = loop
    text = list(b"hello loopstream")

    first = driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(text)]})
    assert first["loss"] > 0 and math.isfinite(first["loss"])
    step = driver.ok(
        "trainer-requests", "OptimStep", run_id, {"adam_params": {"learning_rate": 1e-2}}
    )
    assert step["step"] == 1
    second = driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(text)]})
    assert second["loss"] < first["loss"]  # one step on the same text lowers its loss

    saved = driver.ok("trainer-requests", "SaveWeights", run_id,
                      {"name": "step-1", "kind": "sampler_weights"})  # fmt: skip
    assert saved["path"] == f"bt://loops:{run_id}/sampler_weights/step-1"

    pinned = driver.ok(
        "sampler-requests",
        "Sample",
        sampler_id,
        {"prompt_tokens": text[:4], "num_samples": 2, "max_tokens": 8, "seed": 7,
         "checkpoint_uri": saved["path"]},
    )  # fmt: skip
    version = pinned["weights_version"]
    assert version["checkpoint_id"] == saved["checkpoint_id"]
    assert version["digest"] == saved["content_digest"]
    sequence = pinned["sequences"][0]
    assert len(sequence["tokens"]) == len(sequence["logprobs"]) <= 8

    # The sampler's logprobs are the trainer's logprobs of the same tokens, same weights.
    full = pinned["prompt_tokens"] + sequence["tokens"]
    trainer = driver.ok("trainer-requests", "ComputeLogprobs", run_id, {"sequences": [full]})
    trainer_lp = trainer["logprobs"][0][len(pinned["prompt_tokens"]) :]
    assert max(abs(a - b) for a, b in zip(trainer_lp, sequence["logprobs"], strict=True)) < 1e-3

    # Same seed, same weights: same tokens.
    same_seed = {"prompt_tokens": text[:4], "num_samples": 2, "max_tokens": 8, "seed": 7}
    again = driver.ok("sampler-requests", "Sample", sampler_id, same_seed)
    assert again["weights_version"]["checkpoint_id"] == saved["checkpoint_id"]
    assert again["sequences"] == pinned["sequences"]

    checkpoint = query(driver.settings, "select * from {schema}.checkpoints where uri = %s",
                       saved["path"])  # fmt: skip
    assert checkpoint and checkpoint[0]["checkpoint_id"] == saved["checkpoint_id"]


def test_bad_work_requests_are_rejected_naming_the_field(
    loop: tuple[Driver, str, str, str],
) -> None:
    driver, session_id, run_id, sampler_id = loop
    too_long = driver.call(
        "trainer-requests", "ForwardBackward", run_id, {"data": [datum(list(range(80)))]}
    )
    assert too_long["status"] == "rejected"
    assert "max_seq_len" in too_long["reason"]

    negative = driver.call(
        "trainer-requests", "OptimStep", run_id, {"adam_params": {"learning_rate": -1}}
    )
    assert negative["status"] == "rejected"
    assert negative["field"] == "payload.adam_params.learning_rate"

    unknown = driver.call("trainer-requests", "ForwardBackward", run_id,
                          {"data": [datum([1, 2, 3])], "loss_fn": "hinge"})  # fmt: skip
    assert unknown["status"] == "rejected" and unknown["field"] == "payload.loss_fn"

    missing = driver.call("trainer-requests", "OptimStep", "no-such-run", {})
    assert missing["status"] == "rejected" and "does not exist" in missing["reason"]

    driver.ok("commands", "EndSession", session_id, {})
    for _ in range(100):
        rows = query(driver.settings, "select status from {schema}.samplers where sampler_id = %s",
                     sampler_id)  # fmt: skip
        if rows and rows[0]["status"] != "active":
            break
        time.sleep(0.05)
    ended = driver.call("sampler-requests", "Sample", sampler_id, {"prompt": "hi"})
    assert ended["status"] == "rejected"


def _released(driver: Driver, run_id: str) -> list[dict]:
    return query(
        driver.settings,
        "select payload from {schema}.event_log where aggregate_type = 'trainer' "
        "and aggregate_id = %s and type = 'TrainerReleased'",
        run_id,
    )


@pytest.mark.timeout(240)
def test_ending_sessions_releases_their_trainer_engines_and_refuses_their_work(
    services: Settings,
) -> None:
    loops = [new_loop(services) for _ in range(3)]
    for driver, _, run_id, _ in loops:  # each run's first request loads its engine
        driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum([1, 2, 3])]})
    for driver, session_id, _, _ in loops:
        driver.ok("commands", "EndSession", session_id, {"reason": "done"})

    for driver, _, run_id, _ in loops:
        for _ in range(600):  # the worker hears of RunStopped from the events topic
            released = _released(driver, run_id)
            if released:
                break
            time.sleep(0.05)
        assert len(released) == 1, f"no TrainerReleased for {run_id}"
        assert "done" in released[0]["payload"]["reason"]
        # The count the worker reports after a release leaves out every run it released.
        assert released[0]["payload"]["engines_held"] >= 0

        refused = driver.call(
            "trainer-requests", "ForwardBackward", run_id, {"data": [datum([1, 2, 3])]}
        )
        assert refused["status"] == "rejected"
        assert refused["reason"].startswith(f"run {run_id} is stopped")
        assert refused["field"] == "run_id"
        # Refused without loading the engine again: still one release, nothing to release.
        assert len(_released(driver, run_id)) == 1
