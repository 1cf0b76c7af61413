"""loopstream's own processes die by kill -9 under load: the trainer, the sampler, the API.

A supervisor (here: the test, as `services up` would) starts the dead process again. The
requests in flight must each get exactly one result (accepted, or `failed` and then done by a
retry), the loop goes on, and replay equals live.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from gpu_workers.tiny_model import BOS_ID
from infra.settings import Settings
from tests.faults.loop import Calls, Json, NotRetryable, RlLoop
from tests.faults.test_stack_faults import record
from tests.integration.kafka_helpers import until
from tests.isolated import IsolatedServices


def finish(calls: Calls, request_id: str, path: str, body: Json) -> str:
    """Wait for one request sent before a fault; a `failed` one is done again by a new request.
    Returns how it ended the first time."""
    future = calls.result(request_id, path, body)
    if future["status"] == "rejected":
        raise NotRetryable(f"{path} rejected after the fault: {future.get('reason')}")
    if future["status"] == "failed":
        calls.retried[f"failed: {str(future.get('reason'))[:80]}"] += 1
        calls.call(path, body)
    return str(future["status"])


@pytest.mark.timeout(480)
def test_trainer_worker_killed_mid_step_resumes_and_answers_each_request_once(
    services: IsolatedServices, calls: Calls, settings: Settings, figures: dict[str, Any]
) -> None:
    loop = RlLoop(calls).start()
    loop.step()

    # Mid-step: forward_backward is on its way to the trainer when it dies; optim_step is sent
    # while it is dead. Both are on Kafka, so the restarted worker must answer both, once.
    data, _ = loop.rollouts()
    fb_body = {"data": data, "loss_fn": "importance_sampling"}
    fb_id, _ = calls.post(f"{loop.run_path}/forward_backward", fb_body)
    killed = services.kill("trainer-worker")
    opt_body = {"adam_params": {"learning_rate": 3e-3}}
    opt_id, _ = calls.post(f"{loop.run_path}/optim_step", opt_body)
    restarted_at = time.monotonic()
    services.up()

    figures["forward_backward"] = finish(calls, fb_id, f"{loop.run_path}/forward_backward", fb_body)
    figures["optim_step"] = finish(calls, opt_id, f"{loop.run_path}/optim_step", opt_body)
    figures["answered_after_restart_s"] = round(time.monotonic() - restarted_at, 1)
    assert services.pid("trainer-worker") not in (None, killed)

    loop.save("after-restart")
    loop.step()  # and the loop goes on
    record(figures, loop, calls, settings)


@pytest.mark.timeout(480)
def test_sampler_worker_killed_mid_sync_serves_the_newest_weights_once_back(
    services: IsolatedServices, calls: Calls, settings: Settings, figures: dict[str, Any]
) -> None:
    loop = RlLoop(calls).start()
    loop.step()  # base weights, synced and served

    # The save records a sync for the sampler; the sampler dies while it fetches and applies.
    weights_path = f"/v1/loops/samplers/{loop.sampler_id}/weights"
    before = calls.get(weights_path)["target_version"] or 0
    body = {"name": "mid-sync"}
    save_id, _ = calls.post(f"{loop.run_path}/save_weights_for_sampler", body)
    services.kill("sampler-worker")
    services.up()
    figures["save"] = finish(calls, save_id, f"{loop.run_path}/save_weights_for_sampler", body)
    # The save's sync is recorded by a follow-up command after the save answers: wait for it.
    target = until(
        lambda: (t := calls.get(weights_path)["target_version"]) is not None and t > before and t,
        "the save's sync",
        timeout_s=60,
    )

    # With no request: the worker back hosts a sampler that has a sync pending and applies it.
    until(
        lambda: calls.get(weights_path)["serving_version"] == target,
        "the pending sync applied with no request",
        timeout_s=120,
    )
    # The next rollouts ask for that sync, as the demo does: served from the mid-sync weights.
    sample = calls.call(
        f"/v1/loops/samplers/{loop.sampler_id}/sample",
        {"prompt_tokens": [BOS_ID], "num_samples": 2, "max_tokens": 4,
         "min_weights_version": target},
    )  # fmt: skip
    assert sample["weights_version"]["version"] == target
    # And the read model says so once it has the sampler's events (it trails the result).
    deadline = time.monotonic() + 60
    weights = calls.get(f"/v1/loops/samplers/{loop.sampler_id}/weights")
    while weights["serving_version"] != target and time.monotonic() < deadline:
        time.sleep(0.2)
        weights = calls.get(f"/v1/loops/samplers/{loop.sampler_id}/weights")
    assert weights["serving_version"] == target, weights
    assert weights["serving_uri"].endswith("/sampler_weights/mid-sync"), weights
    loop.step()  # and the loop goes on
    figures["sync_version"] = target
    record(figures, loop, calls, settings)


BURST = 60
SENDERS = 4


@pytest.mark.timeout(480)
def test_api_killed_during_a_burst_loses_and_doubles_no_command(
    services: IsolatedServices, calls: Calls, settings: Settings, figures: dict[str, Any]
) -> None:
    loop = RlLoop(calls).start()
    path = f"/v1/loops/samplers/{loop.sampler_id}/sample"
    bodies = [
        {"prompt_tokens": [BOS_ID], "num_samples": 1, "max_tokens": 2, "seed": i}
        for i in range(BURST)
    ]
    sent: dict[int, str] = {}
    errors: list[BaseException] = []

    def sender(indexes: range) -> None:
        try:
            for i in indexes:
                sent[i], _ = calls.post(path, bodies[i])  # retried with the same key
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=sender, args=(range(k, BURST, SENDERS),), daemon=True)
        for k in range(SENDERS)
    ]
    for thread in threads:
        thread.start()
    while len(sent) < BURST // 4 and any(t.is_alive() for t in threads):
        time.sleep(0.005)
    figures["sent_before_kill"] = len(sent)
    services.kill("api")
    services.up()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(sent) == BURST

    outcomes = [finish(calls, sent[i], path, bodies[i]) for i in range(BURST)]
    figures["burst"] = BURST
    figures["outcomes"] = {s: outcomes.count(s) for s in set(outcomes)}
    record(figures, loop, calls, settings)
