"""A small RL-like loop through the REST API that keeps going through faults, and a ledger of it.

`Calls` is the SDK's own transport (`api.client._Http`) with idempotency keys chosen here, so a
test knows every request id the API accepted and can check that each got exactly one result. A
call is retried only on errors a client is told it may retry:

- a transport error (connection refused or reset: the API is down or restarting),
- a 5xx answer (the API could not reach Kafka or PostgreSQL),
- "unknown request, resubmit" (the API restarted and forgot it): the same key is sent again,
- a future that ended `failed` (the worker could not do it): a new request is sent.

A `rejected` future is the user's fault by contract, so it is never retried and fails the test.
Every retried error is recorded, for the assertions and for docs/faults.md.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from api.client import LoopsError, UnknownRequestError, _Http
from gpu_workers.tiny_model import BOS_ID

Json = dict[str, Any]
TARGET_BYTE = ord("a")


class NotRetryable(AssertionError):
    """A call ended in a way a client may not retry: the fault leaked as the user's error."""


@dataclass
class Calls:
    base_url: str
    api_key: str | None
    # How long one call may keep retrying before the test gives up on it.
    patience_s: float = 120.0
    accepted: dict[str, str] = field(default_factory=dict)  # request id -> path, 202 answered
    retried: Counter[str] = field(default_factory=Counter)  # kind of retried error -> count
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.http = _Http(self.base_url, timeout_s=10.0, client=None, api_key=self.api_key)

    def close(self) -> None:
        self.http.client.close()

    def _retry(self, kind: str) -> None:
        with self._lock:
            self.retried[kind] += 1
        time.sleep(0.5)

    def post(self, path: str, body: Json, *, method: str = "POST") -> tuple[str, Json]:
        """Send until the API takes it (202); the same key every time. Returns (id, answer)."""
        request_id = str(uuid.uuid4())
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                answer = self.http.request(method, path, json=body, request_id=request_id)
            except (httpx.TransportError, LoopsError) as exc:
                self._check_retryable(exc, deadline, path)
                continue
            with self._lock:
                self.accepted[request_id] = path
                self.calls += 1
            return request_id, answer

    def result(self, request_id: str, path: str, body: Json, *, method: str = "POST") -> Json:
        """The request's result, long-polling through faults; resends the same key when the API
        forgot it."""
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                future = self.http.request(
                    "GET", f"/v1/loops/futures/{request_id}", params={"wait": 5.0}, timeout_s=20.0
                )
            except UnknownRequestError:
                self._retry("unknown request, resubmitted")
                self.http.request(method, path, json=body, request_id=request_id)
                continue
            except (httpx.TransportError, LoopsError) as exc:
                self._check_retryable(exc, deadline, path)
                continue
            if future["status"] == "pending":
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{path} {request_id} still pending after {self.patience_s}s"
                    )
                continue
            return future  # type: ignore[no-any-return]

    def call(self, path: str, body: Json, *, method: str = "POST") -> Json:
        """Submit and wait; a `failed` request is sent again as a new request."""
        deadline = time.monotonic() + self.patience_s
        while True:
            request_id, _ = self.post(path, body, method=method)
            future = self.result(request_id, path, body, method=method)
            if future["status"] == "accepted":
                return future.get("result") or {}
            if future["status"] == "rejected" or time.monotonic() > deadline:
                raise NotRetryable(f"{path} {future['status']}: {future.get('reason')}")
            self._retry(f"failed: {str(future.get('reason'))[:80]}")

    def _check_retryable(self, exc: Exception, deadline: float, path: str) -> None:
        if isinstance(exc, LoopsError) and exc.status_code < 500:
            raise NotRetryable(f"{path}: {exc}") from exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: still failing after {self.patience_s}s: {exc}") from exc
        kind = type(exc).__name__ if isinstance(exc, httpx.TransportError) else f"http {exc}"
        self._retry(kind[:100])

    # --- reads, retried the same way ------------------------------------------------------------

    def get(self, path: str, **params: object) -> Json:
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                return self.http.request("GET", path, params=params or None)
            except (httpx.TransportError, LoopsError) as exc:
                if isinstance(exc, LoopsError) and exc.status_code == 404:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # a read model that has not caught up yet
                    continue
                self._check_retryable(exc, deadline, path)


# --- the loop -------------------------------------------------------------------------------------


def reward(tokens: list[int]) -> float:
    return sum(t == TARGET_BYTE for t in tokens) / max(len(tokens), 1)


@dataclass
class RlLoop:
    """One session, run and sampler; `step()` samples, trains on the rewards and syncs."""

    calls: Calls
    group: int = 4
    max_tokens: int = 6
    session_id: str = ""
    run_id: str = ""
    sampler_id: str = ""
    rewards: list[float] = field(default_factory=list)
    saved: list[Json] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    # The call the loop is in, for a test that injects a fault at a chosen point of a step.
    phase: str = "idle"

    def start(self) -> RlLoop:
        _, created = self.calls.post("/v1/loops/sessions", {"base_model": "loopstream/tiny-llama"})
        self.session_id = created["session_id"]
        self.calls.get(f"/v1/loops/sessions/{self.session_id}")
        run_body = {"session_id": self.session_id, "max_seq_len": 64}
        request_id, run = self.calls.post("/v1/loops/runs", run_body)
        self.calls.result(request_id, "/v1/loops/runs", run_body)
        self.run_id, self.sampler_id = run["run_id"], run["sampler_id"]
        self.calls.get(f"/v1/loops/runs/{self.run_id}")
        return self

    def step(self) -> None:
        started = time.monotonic()
        data, mean = self.rollouts()
        self.train(data)
        self.save(f"step-{len(self.rewards):03d}")
        self.rewards.append(mean)
        self.step_s.append(time.monotonic() - started)

    def rollouts(self) -> tuple[list[Json], float]:
        """Sample a group from the sampler's newest weights; (training data, mean reward)."""
        self.phase = "sample"
        sample = self.calls.call(
            f"/v1/loops/samplers/{self.sampler_id}/sample",
            {"prompt_tokens": [BOS_ID], "num_samples": self.group,
             "max_tokens": self.max_tokens, "seed": len(self.rewards)},
        )  # fmt: skip
        sequences = sample["sequences"]
        rewards_G = [reward(s["tokens"]) for s in sequences]
        mean = statistics.fmean(rewards_G)
        data = [
            {
                "model_input": [BOS_ID, *s["tokens"][:-1]],
                "loss_fn_inputs": {
                    "target_tokens": s["tokens"],
                    "logprobs": s["logprobs"],
                    "advantages": [r - mean] * len(s["tokens"]),  # reward - group mean
                },
            }
            for s, r in zip(sequences, rewards_G, strict=True)
        ]
        return data, mean

    @property
    def run_path(self) -> str:
        return f"/v1/loops/runs/{self.run_id}"

    def train(self, data: list[Json]) -> None:
        self.phase = "forward_backward"
        self.calls.call(
            f"{self.run_path}/forward_backward",
            {"data": data, "loss_fn": "importance_sampling"},
        )
        self.phase = "optim_step"
        self.calls.call(f"{self.run_path}/optim_step", {"adam_params": {"learning_rate": 3e-3}})

    def save(self, name: str) -> Json:
        self.phase = "save"
        saved = self.calls.call(f"{self.run_path}/save_weights_for_sampler", {"name": name})
        self.saved.append(saved)
        self.phase = "idle"
        return saved


class Background:
    """Runs `steps` loop steps on a thread, so a test can inject a fault meanwhile."""

    def __init__(self, loop: RlLoop, steps: int) -> None:
        self.loop = loop
        self.steps = steps
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for _ in range(self.steps):
                self.loop.step()
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def start(self) -> Background:
        self.thread.start()
        return self

    def wait_for_steps(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.loop.rewards) < n:
            if self.error is not None or not self.thread.is_alive():
                self.join(0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the loop did not reach step {n} in {timeout_s}s")
            time.sleep(0.05)

    def join(self, timeout_s: float = 300.0) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the loop did not finish in {timeout_s}s")
        if self.error is not None:
            raise self.error
