"""A session's Tinker calls land in the event log as the same events as the /v1/loops calls.

The same sequence (create a trainer, forward_backward, optim_step, save sampler weights, save the
training state, sample from the saved weights) is made once through the official `tinker` SDK and
once through loopstream's own REST client; `events.audit.history` of each side's session, run and
sampler aggregates must hold the same event types in the same order.
"""

from __future__ import annotations

import time

import tinker
from tinker import types

from api.auth import parse_key
from api.client import ServiceClient
from api.tinker import ids
from events.audit import history
from infra.settings import Settings

TINY = "loopstream/tiny-llama"
TOKENS = [257, 97, 98, 99, 97]  # BOS + bytes of the tiny model's vocabulary


def _tinker_calls(api_key: str) -> tuple[str, str, str]:
    from api.config import get_api_settings

    service = tinker.ServiceClient(base_url=get_api_settings().base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=TINY, rank=0).result()
    datum = tinker.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64", shape=[4]),
            "weights": types.TensorData(data=[1.0] * 4, dtype="float32", shape=[4]),
        },
    )
    fb = training.forward_backward([datum], "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result(), step.result()
    saved = training.save_weights_for_sampler("audit-sampler").result()
    training.save_state("audit-state").result()
    sampler = service.create_sampling_client(model_path=saved.path).result()
    prompt = types.ModelInput.from_ints(TOKENS[:2])
    sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=0)).result()
    service.close("success").result()
    run_id = ids.run_id_of(training.model_id)
    return run_id.replace("-train-", "-s-"), run_id, ids.sampler_id_of(training.model_id)


def _rest_calls() -> tuple[str, str, str]:
    service = ServiceClient()
    session = service.create_session(TINY, project="tinker-audit")
    training = service.create_training_client(session, max_seq_len=64)
    datum = {
        "model_input": TOKENS[:-1],
        "loss_fn_inputs": {"target_tokens": TOKENS[1:], "weights": [1.0] * 4},
    }
    fb = training.forward_backward([datum], "cross_entropy")
    step = training.optim_step({"learning_rate": 1e-3})
    fb.result(), step.result()
    sampler = training.save_weights_and_get_sampling_client("audit-sampler")
    training.save_weights("audit-state").result()
    sampler.sample(prompt_tokens=TOKENS[:2], num_samples=2, max_tokens=4, seed=0).result()
    # As the Tinker client's close (finish_session) ends its model's loops session.
    service.end_session(session.session_id, reason="tinker session finished").result()
    service.close()
    return session.session_id, training.run_id, training.sampler_id


def _types_when_settled(settings: Settings, aggregates: tuple[str, ...]) -> list[list[str]]:
    """Event types per aggregate, read again until two reads agree (a save's follow-up events,
    such as the session recording the checkpoint, are committed just after its result)."""
    last: list[list[str]] = []
    for _ in range(20):
        now = [[e.type for e in history(settings, a)] for a in aggregates]
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    return last


def test_tinker_calls_are_the_same_events_as_rest_calls(services: Settings, api_key: str) -> None:
    tinker_aggregates = _tinker_calls(api_key)
    tinker_types = _types_when_settled(services, tinker_aggregates)
    rest_types = _types_when_settled(services, _rest_calls())
    assert tinker_types == rest_types
    # And they are the Tinker calls' own events: caused by the commands the front door sent.
    # (A worker's own events, such as TrainerReleased after the session ended, have no command.)
    run_events = [e for e in history(services, tinker_aggregates[1]) if e.command_id]
    assert all(e.command_id.startswith("tinker:") for e in run_events), run_events  # type: ignore[union-attr]
    # The audit trail names the key that sent each command (its id, never the key itself).
    key_id = parse_key(api_key)[0]  # type: ignore[index]
    assert {e.actor for e in run_events} == {key_id}, {e.actor for e in run_events}
    session, run, sampler = tinker_types
    for expected in ("ForwardBackwardCompleted", "OptimStepCompleted", "WeightsSaved"):
        assert expected in run, run
    assert "CheckpointSaved" in session or "CheckpointSaved" in run
    assert "SamplesGenerated" in sampler, sampler
