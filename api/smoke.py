"""Smoke check: one short Loops session through every loopstream service, then ended.

Each step goes through the REST API with the SDK and waits for its future, so a step that
passes has crossed the API, Kafka, the command processor and the projections (the future and
the read models are written there); the steps that need a worker also cross it:

1. create a session (on the project's tiny model);
2. create a run: a trainer and its sampler;
3. sample 4 tokens (sampler worker);
4. forward_backward with cross_entropy on them, then optim_step (trainer worker);
5. save sampler weights and hotload them (trainer worker writes the S3 store, sampler loads);
6. read the checkpoint back from the read models;
7. end the session, and read it back as ended.

The first step that fails raises SmokeError naming it; nothing is left running on success.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.client import ServiceClient

SMOKE_MODEL = "loopstream/tiny-llama"


class SmokeError(RuntimeError):
    pass


@dataclass
class SmokeReport:
    session_id: str = ""
    run_id: str = ""
    sampler_id: str = ""
    checkpoint_id: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)  # {step, ms, detail}

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "sampler_id": self.sampler_id,
            "checkpoint_id": self.checkpoint_id,
            "steps": self.steps,
            "total_ms": round(sum(s["ms"] for s in self.steps), 1),
        }


def run_smoke(
    client: ServiceClient,
    *,
    timeout_s: float = 120.0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> SmokeReport:
    report = SmokeReport()

    def step(name: str, fn: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail = fn()
        except Exception as exc:
            raise SmokeError(f"{name}: {exc}") from exc
        done = {"step": name, "ms": round((time.monotonic() - started) * 1000, 1), "detail": detail}
        report.steps.append(done)
        if on_step is not None:
            on_step(done)

    state: dict[str, Any] = {}

    def create_session() -> str:
        session = client.create_session(SMOKE_MODEL, project="smoke", timeout=timeout_s)
        report.session_id = session.session_id
        return f"session {session.session_id} on {SMOKE_MODEL}"

    def create_run() -> str:
        state["training"] = training = client.create_training_client(
            report.session_id, max_seq_len=64, timeout=timeout_s
        )
        report.run_id, report.sampler_id = training.run_id, training.sampler_id
        return f"run {training.run_id}, sampler {training.sampler_id}"

    def sample() -> str:
        sampling = state["training"].sampling_client()
        result = sampling.sample(prompt="a", max_tokens=4, seed=0).result(timeout_s)
        state["tokens"] = result["prompt_tokens"] + result["sequences"][0]["tokens"]
        return f"{len(result['sequences'][0]['tokens'])} tokens from the sampler worker"

    def train() -> str:
        tokens = state["tokens"] * 2 if len(state["tokens"]) < 2 else state["tokens"]
        datum = {
            "model_input": tokens[:-1],
            "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        }
        loss = state["training"].forward_backward([datum]).result(timeout_s)["loss"]
        optim = state["training"].optim_step().result(timeout_s)
        return f"loss {loss:.3f}, optimizer step {optim['step']} on the trainer worker"

    def save_weights() -> str:
        saved = state["training"].save_weights_for_sampler("smoke").result(timeout_s)
        report.checkpoint_id = saved["checkpoint_id"]
        return f"{saved['path']} written and hotloaded"

    def read_checkpoint() -> str:
        checkpoint = client.get_checkpoint(report.checkpoint_id)
        return f"{len(checkpoint['files'])} files, {checkpoint['total_size_bytes']:,} bytes"

    def end_session() -> str:
        client.end_session(report.session_id, reason="smoke check done").result(timeout_s)
        deadline = time.monotonic() + timeout_s
        while client.get_session(report.session_id)["status"] != "ended":
            if time.monotonic() > deadline:
                raise SmokeError("the session did not reach the read models as ended")
            time.sleep(0.05)
        return f"session {report.session_id} ended"

    try:
        step("create session", create_session)
        step("create run", create_run)
        step("sample", sample)
        step("forward_backward + optim_step", train)
        step("save sampler weights", save_weights)
        step("read checkpoint", read_checkpoint)
        step("end session", end_session)
    except SmokeError:
        if report.session_id and not any(s["step"] == "end session" for s in report.steps):
            # Leave nothing behind; the first failure is the one to report.
            with contextlib.suppress(Exception):
                client.end_session(report.session_id, reason="smoke check failed")
        raise
    return report
