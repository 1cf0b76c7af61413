"""A run started from another run's full-state checkpoint continues it exactly."""

from __future__ import annotations

import time
import uuid

import pytest

from api.client import LoopsError, RequestRejectedError, ServiceClient
from api.kafka_driver import Driver, datum, query
from commands.work import AdamParams, Datum, LossFnInputs
from infra.settings import Settings


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


@pytest.mark.timeout(180)
def test_load_state_through_the_sdk_restores_the_run_and_hands_back_the_data_position(
    services: Settings,
) -> None:
    """REST + SDK: save the full state with the caller's data position, train on, load it back
    (v2: DCP weights and AdamW moments, step, RNG): the next two steps repeat exactly."""
    tokens = list(b"resume me exactly")
    batch = [Datum(model_input=tokens, loss_fn_inputs=LossFnInputs(
        target_tokens=tokens, weights=[1.0] * len(tokens)))]  # fmt: skip
    adam = AdamParams(learning_rate=5e-3)
    with ServiceClient() as service:
        trainer = service.create_training_client(
            service.create_session(services.tiny_model_name), max_seq_len=64
        )
        trainer.forward_backward(batch).result(60)
        trainer.optim_step(adam).result(60)
        saved = trainer.save_weights("epoch-0", loader_state={"epoch": 0, "batch": 1}).result(60)

        def two_steps() -> list[float]:
            losses = []
            for _ in range(2):
                losses.append(trainer.forward_backward(batch).result(60)["loss"])
                trainer.optim_step(adam).result(60)
            return losses

        first = two_steps()
        loaded = trainer.load_state(saved["path"]).result(60)
        assert loaded["loader_state"] == {"epoch": 0, "batch": 1}
        assert loaded["step"] == 1
        assert two_steps() == first  # bit for bit: same weights, moments and step

        # A field of the other kind of save is named at the door (422), not ignored.
        with pytest.raises(LoopsError) as err:
            trainer._post("save_weights", {"name": "x", "hotload": None})
        assert err.value.status_code == 422 and err.value.field == "hotload"
        with pytest.raises(LoopsError) as err:
            trainer._post("save_weights_for_sampler", {"name": "y", "loader_state": {"a": 1}})
        assert err.value.field == "loader_state"
        with pytest.raises(RequestRejectedError, match="loader_state"):
            trainer.save_weights("big", loader_state={"x": "y" * 70_000}).result(60)
