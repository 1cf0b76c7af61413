"""Python SDK of the Loops REST API, shaped like the Tinker / Loops SDK.

    service = ServiceClient("http://127.0.0.1:18000")   # key: api_key=, LOOPSTREAM_API_KEY,
                                                        # else the stack's default key file
    session = service.create_session("loopstream/tiny-llama")
    trainer = service.create_training_client(session, max_seq_len=256)
    fb = trainer.forward_backward(data, "importance_sampling")   # APIFuture, returns at once
    trainer.optim_step(AdamParams(learning_rate=3e-3)).result()
    sampler = trainer.save_weights_and_get_sampling_client("step-1")
    out = sampler.sample(prompt="a", num_samples=8, max_tokens=16).result()

Every call carries an idempotency key chosen here, so a retried POST or a resubmission after
"unknown request" never does the work twice.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from commands.loops import HotloadOptions
from commands.work import AdamParams, CompressionFormat, Datum, LossFn

if TYPE_CHECKING:
    from infra.settings import Settings

T = TypeVar("T")
Json = dict[str, Any]

# Long-polls are cut in slices of this many seconds: short enough for proxies, long enough to
# make one round trip per result in practice.
POLL_SLICE_S = 30.0


# --- errors -------------------------------------------------------------------------------------


class LoopsError(Exception):
    """An HTTP error of the API: status code, message naming the field, and the field."""

    def __init__(self, status_code: int, detail: str, field: str | None = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.field = field


class UnknownRequestError(LoopsError):
    """The API has no record of the request (expired or lost): resubmit it."""


class MissingApiKeyError(Exception):
    """No API key was given, LOOPSTREAM_API_KEY is unset and the stack wrote no default key."""


class RequestFailedError(Exception):
    """A request that completed without success: `rejected` (its input or a rule; `field` says
    which) or `failed` (the worker could not do it; resubmitting may work)."""

    def __init__(self, request_id: str, status: str, reason: str | None, field: str | None) -> None:
        super().__init__(f"request {request_id} {status}: {reason}")
        self.request_id = request_id
        self.status = status
        self.reason = reason
        self.field = field


class RequestRejectedError(RequestFailedError):
    pass


class WorkerFailedError(RequestFailedError):
    pass


class ChecksumMismatchError(Exception):
    pass


# --- transport ----------------------------------------------------------------------------------


API_KEY_ENV = "LOOPSTREAM_API_KEY"


def resolve_api_key(api_key: str | None = None, settings: Settings | None = None) -> str | None:
    """The key a client sends: the one given, else $LOOPSTREAM_API_KEY, else the default
    workspace's admin key that `stack up` / `services up` wrote under the data directory."""
    if api_key:
        return api_key
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    from api.bootstrap import default_api_key
    from infra.settings import get_settings

    return default_api_key(settings or get_settings())


class _Http:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        client: httpx.Client | None,
        api_key: str | None,
    ) -> None:
        self.client = client or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.timeout_s = timeout_s
        self.api_key = api_key

    def _auth_headers(self) -> dict[str, str]:
        # Checked at the first request, not at construction: a client that never calls out (a
        # unit test, a WeightSyncer without a deploy manager) needs no key.
        if self.api_key is None:
            raise MissingApiKeyError(
                f"no API key: pass ServiceClient(api_key=...), set {API_KEY_ENV}, or run "
                "`loopstream services up`, which writes the default workspace's key under the "
                "data directory"
            )
        return {"Authorization": f"Api-Key {self.api_key}"}

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Json | None = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Json:
        headers = self._auth_headers()
        if request_id:
            headers["Idempotency-Key"] = request_id
        # A POST with an idempotency key is safe to send again after a connection error.
        attempts = 3 if request_id or method == "GET" else 1
        for attempt in range(attempts):
            try:
                # Only long-polls need a timeout of their own; the rest use the client's.
                extra: dict[str, Any] = {"timeout": timeout_s} if timeout_s else {}
                response = self.client.request(
                    method, path, json=json, params=params, headers=headers, **extra
                )
                break
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if response.status_code >= 400:
            try:
                body = response.json()
                detail, field = str(body.get("detail")), body.get("field")
            except ValueError:
                detail, field = response.text, None
            error = UnknownRequestError if "unknown request" in detail else LoopsError
            raise error(response.status_code, detail, field)
        return response.json()  # type: ignore[no-any-return]


# --- futures ------------------------------------------------------------------------------------


class APIFuture(Generic[T]):
    """The result of one request, fetched by long-polling `GET /v1/loops/futures/{id}`."""

    def __init__(
        self,
        http: _Http,
        request_id: str,
        *,
        transform: Callable[[Json], T],
        resubmit: Callable[[], object] | None = None,
    ) -> None:
        self.http = http
        self.request_id = request_id
        self._transform = transform
        self._resubmit = resubmit
        self._future: Json | None = None

    def poll(self, wait_s: float = 0.0) -> Json:
        """The future's JSON (`status` pending|accepted|rejected|failed)."""
        if self._future is not None:
            return self._future
        future = self.http.request(
            "GET",
            f"/v1/loops/futures/{self.request_id}",
            params={"wait": round(wait_s, 3)},
            timeout_s=wait_s + self.http.timeout_s,
        )
        if future["status"] != "pending":
            self._future = future
        return future

    def done(self) -> bool:
        return self.poll()["status"] != "pending"

    def result(self, timeout: float | None = None) -> T:
        """Wait for the result; raise RequestRejectedError/WorkerFailedError if it did not
        succeed, TimeoutError if none came within `timeout` seconds (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        resubmitted = False
        while True:
            remaining = POLL_SLICE_S if deadline is None else deadline - time.monotonic()
            try:
                future = self.poll(max(0.0, min(POLL_SLICE_S, remaining)))
            except UnknownRequestError:
                # The result expired or the request was lost (e.g. an API restart): send it
                # again under the same key, once; whoever did it already dedupes it.
                if self._resubmit is None or resubmitted:
                    raise
                self._resubmit()
                resubmitted = True
                continue
            status = future["status"]
            if status == "accepted":
                return self._transform(future.get("result") or {})
            if status in ("rejected", "failed"):
                error = RequestRejectedError if status == "rejected" else WorkerFailedError
                raise error(self.request_id, status, future.get("reason"), future.get("field"))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.request_id} still pending after {timeout}s")


def _identity(output: Json) -> Json:
    return output


def _dump(value: BaseModel | Json) -> Json:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)


# --- resources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    session_id: str
    base_model: str


class ServiceClient:
    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        """`api_key`: sent as `Authorization: Api-Key <key>`; None takes $LOOPSTREAM_API_KEY,
        else the default key file (see resolve_api_key)."""
        if base_url is None:
            from api.config import get_api_settings

            base_url = get_api_settings().base_url
        self.base_url = base_url.rstrip("/")
        self.http = _Http(
            self.base_url,
            timeout_s=timeout_s,
            client=http_client,
            api_key=resolve_api_key(api_key),
        )

    def close(self) -> None:
        self.http.client.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes -----------------------------------------------------------------------------------

    def _submit(self, path: str, body: Json, transform: Callable[[Json], T]) -> APIFuture[T]:
        """POST a request under a fresh idempotency key; the future can resubmit it."""
        request_id = str(uuid.uuid4())

        def send() -> Json:
            return self.http.request("POST", path, json=body, request_id=request_id)

        send()
        return APIFuture(self.http, request_id, transform=transform, resubmit=send)

    def create_session(
        self,
        base_model: str,
        *,
        project: str | None = None,
        name: str | None = None,
        timeout: float = 60.0,
    ) -> Session:
        """Create a session and wait until it can take runs."""
        request_id = str(uuid.uuid4())
        body = {"base_model": base_model, "project": project, "name": name}
        accepted = self.http.request("POST", "/v1/loops/sessions", json=body, request_id=request_id)
        APIFuture(self.http, accepted["request_id"], transform=_identity).result(timeout)
        session_id = accepted["session_id"]
        # The future and the session row come from different topics: wait for the row too.
        self._wait_for(f"/v1/loops/sessions/{session_id}", timeout=timeout)
        return Session(session_id=session_id, base_model=base_model)

    def create_training_client(
        self,
        session: Session | str,
        *,
        max_seq_len: int,
        lora_rank: int = 0,
        from_checkpoint: str | None = None,
        keep_last_checkpoints: int | None = None,
        timeout: float = 60.0,
    ) -> TrainingClient:
        """Provision a run (trainer) and its sampler; returns once both exist.

        `keep_last_checkpoints`: retention per kind; a save beyond that many deletes the oldest
        (never a link of a live delta chain, nor what the sampler serves). None keeps all."""
        session_id = session.session_id if isinstance(session, Session) else session
        body = {"session_id": session_id, "max_seq_len": max_seq_len, "lora_rank": lora_rank,
                "from_checkpoint": from_checkpoint,
                "keep_last_checkpoints": keep_last_checkpoints}  # fmt: skip
        accepted = self.http.request(
            "POST", "/v1/loops/runs", json=body, request_id=str(uuid.uuid4())
        )
        APIFuture(self.http, accepted["request_id"], transform=_identity).result(timeout)
        self._wait_for(f"/v1/loops/runs/{accepted['run_id']}", timeout=timeout)
        return TrainingClient(
            self, run_id=accepted["run_id"], sampler_id=accepted["sampler_id"],
            max_seq_len=max_seq_len,
        )  # fmt: skip

    def create_sampling_client(
        self, sampler_id: str, checkpoint_uri: str | None = None
    ) -> SamplingClient:
        """A client of one sampler: pinned to `checkpoint_uri`, or following the latest
        weights when None."""
        return SamplingClient(self, sampler_id=sampler_id, checkpoint_uri=checkpoint_uri)

    def end_session(self, session_id: str, *, reason: str = "ended by user") -> APIFuture[Json]:
        request_id = str(uuid.uuid4())

        def send() -> Json:
            return self.http.request(
                "DELETE", f"/v1/loops/sessions/{session_id}", params={"reason": reason},
                request_id=request_id,
            )  # fmt: skip

        send()
        return APIFuture(self.http, request_id, transform=_identity, resubmit=send)

    def promote_checkpoint(
        self, checkpoint_id: str, *, environment: str = "production"
    ) -> APIFuture[Json]:
        """Promote a sampler checkpoint (a base, or any LoRA one) to an environment; a
        non-promotable one is rejected with the rule."""
        return self._submit(
            f"/v1/loops/checkpoints/{checkpoint_id}/promote", {"environment": environment},
            _identity,
        )  # fmt: skip

    def delete_checkpoint(self, checkpoint_id: str) -> APIFuture[Json]:
        request_id = str(uuid.uuid4())

        def send() -> Json:
            return self.http.request(
                "DELETE", f"/v1/loops/checkpoints/{checkpoint_id}", request_id=request_id
            )

        send()
        return APIFuture(self.http, request_id, transform=_identity, resubmit=send)

    # --- reads ----------------------------------------------------------------------------------

    def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[Json]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self.http.request("GET", "/v1/loops/sessions", params=params)["data"]  # type: ignore[no-any-return]

    def get_session(self, session_id: str) -> Json:
        return self.http.request("GET", f"/v1/loops/sessions/{session_id}")

    def list_runs(self, *, limit: int = 100) -> list[Json]:
        """The workspace's runs, newest first, across its sessions."""
        page = self.http.request("GET", "/v1/loops/runs", params={"limit": limit})
        return list(page["data"])

    def get_run(self, run_id: str) -> Json:
        return self.http.request("GET", f"/v1/loops/runs/{run_id}")

    def list_checkpoints(self, run_id: str, *, include_deleted: bool = False) -> list[Json]:
        return self.http.request(  # type: ignore[no-any-return]
            "GET", f"/v1/loops/runs/{run_id}/checkpoints",
            params={"include_deleted": include_deleted},
        )["data"]  # fmt: skip

    def get_checkpoint(self, checkpoint_id: str) -> Json:
        return self.http.request("GET", f"/v1/loops/checkpoints/{checkpoint_id}")

    def get_sampler_weights(self, sampler_id: str) -> Json:
        """What the sampler serves, the newest sync sent to it, the last hotload's outcome."""
        return self.http.request("GET", f"/v1/loops/samplers/{sampler_id}/weights")

    def list_weight_syncs(
        self,
        sampler_id: str,
        *,
        request_id: str | None = None,
        checkpoint_id: str | None = None,
        limit: int = 50,
    ) -> list[Json]:
        """The sampler's numbered syncs, newest first, each with its hotload outcome."""
        params: dict[str, Any] = {"limit": limit}
        if request_id is not None:
            params["request_id"] = request_id
        if checkpoint_id is not None:
            params["checkpoint_id"] = checkpoint_id
        page = self.http.request("GET", f"/v1/loops/samplers/{sampler_id}/syncs", params=params)
        return list(page["data"])

    def get_future(self, request_id: str, *, wait_s: float = 0.0) -> Json:
        return APIFuture(self.http, request_id, transform=_identity).poll(wait_s)

    def iter_checkpoint_files(self, checkpoint_id: str, *, page_size: int = 100) -> Iterator[Json]:
        """Every `{url, relative_file_name, size_bytes}` of a checkpoint, page by page."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"page_size": page_size}
            if token:
                params["page_token"] = token
            page = self.http.request(
                "GET", f"/v1/loops/checkpoints/{checkpoint_id}/files", params=params
            )
            yield from page["presigned_urls"]
            token = page["next_page_token"]
            if not token:
                return

    def download_checkpoint(
        self, checkpoint_id: str, dest: str | os.PathLike[str], *, page_size: int = 100
    ) -> Path:
        """Fetch every file of a checkpoint into `dest` through its presigned URLs and verify
        each against the size and sha256 the checkpoint recorded."""
        expected = {f["relative_file_name"]: f for f in self.get_checkpoint(checkpoint_id)["files"]}
        root = Path(dest)
        seen: set[str] = set()
        # Presigned URLs carry their own auth; a plain client keeps the API's base URL out.
        with httpx.Client(timeout=self.http.timeout_s) as raw:
            for entry in self.iter_checkpoint_files(checkpoint_id, page_size=page_size):
                name = entry["relative_file_name"]
                target = (root / name).resolve()
                if not target.is_relative_to(root.resolve()):
                    raise ChecksumMismatchError(f"{name}: path leaves the destination folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                digest, size = hashlib.sha256(), 0
                with raw.stream("GET", entry["url"]) as response, partial.open("wb") as out:
                    response.raise_for_status()
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                want = expected.get(name)
                if (
                    want is None
                    or size != want["size_bytes"]
                    or digest.hexdigest() != want["sha256"]
                ):
                    partial.unlink(missing_ok=True)
                    raise ChecksumMismatchError(
                        f"{name}: got {size} bytes sha256 {digest.hexdigest()}, checkpoint "
                        f"records {want and want['size_bytes']} bytes sha256 "
                        f"{want and want['sha256']}"
                    )
                partial.replace(target)
                seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ChecksumMismatchError(f"files not listed by the API: {missing}")
        return root

    def _wait_for(self, path: str, *, timeout: float) -> Json:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.http.request("GET", path)
            except LoopsError as exc:
                if exc.status_code != 404 or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)


class TrainingClient:
    """Training calls on one run; each returns an APIFuture at once (calls pipeline)."""

    def __init__(
        self, service: ServiceClient, *, run_id: str, sampler_id: str, max_seq_len: int
    ) -> None:
        self.service = service
        self.run_id = run_id
        self.sampler_id = sampler_id
        self.max_seq_len = max_seq_len

    def _post(self, action: str, body: Json) -> APIFuture[Json]:
        return self.service._submit(f"/v1/loops/runs/{self.run_id}/{action}", body, _identity)

    def forward_backward(
        self,
        data: Sequence[Datum | Json],
        loss_fn: LossFn = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[Json]:
        """Result: {loss, metrics, loss_fn_outputs}."""
        return self._post("forward_backward", {"data": [_dump(d) for d in data],
                          "loss_fn": loss_fn, "loss_fn_config": loss_fn_config})  # fmt: skip

    def forward(
        self,
        data: Sequence[Datum | Json],
        loss_fn: LossFn = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[Json]:
        """The loss without touching the gradients. Result as forward_backward."""
        return self._post("forward", {"data": [_dump(d) for d in data], "loss_fn": loss_fn,
                                      "loss_fn_config": loss_fn_config})  # fmt: skip

    def load_state(self, checkpoint_uri: str, *, optimizer: bool = True) -> APIFuture[Json]:
        """Load a full-state checkpoint into this run. Result: {path, step, loader_state}."""
        return self._post("load_state", {"checkpoint_uri": checkpoint_uri, "optimizer": optimizer})

    def optim_step(self, adam_params: AdamParams | Json | None = None) -> APIFuture[Json]:
        """Result: {step, metrics}."""
        return self._post("optim_step", {"adam_params": _dump(adam_params or AdamParams())})

    def compute_logprobs(self, sequences: Sequence[Sequence[int]]) -> APIFuture[Json]:
        """Result: {logprobs: one list per sequence}."""
        return self._post("compute_logprobs", {"sequences": [list(s) for s in sequences]})

    def save_weights(
        self,
        name: str,
        *,
        ttl_seconds: int | None = None,
        loader_state: Json | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[Json]:
        """Full training state (resumable); `loader_state` is the caller's data position, handed
        back on load; `user_metadata` the caller's labels on the checkpoint. Result: {path
        (bt://loops URI), checkpoint_id, ...}."""
        body: Json = {"name": name, "ttl_seconds": ttl_seconds}
        if loader_state is not None:
            body["loader_state"] = loader_state
        if user_metadata is not None:
            body["user_metadata"] = user_metadata
        return self._post("save_weights", body)

    def save_weights_for_sampler(
        self,
        name: str,
        *,
        ttl_seconds: int | None = None,
        checkpoint_type: str | None = None,
        compression_format: CompressionFormat | None = None,
        hotload: bool | HotloadOptions = True,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[Json]:
        """Sampler weights: a `base`, or a `delta` against the last sampler save. Synced to the
        run's sampler (`hotload` True or options) or only saved (`hotload=False`). Result as
        save_weights, plus checkpoint_type."""
        body: Json = {"name": name, "ttl_seconds": ttl_seconds, "checkpoint_type": checkpoint_type}
        if user_metadata is not None:
            body["user_metadata"] = user_metadata
        if compression_format is not None:
            body["compression_format"] = compression_format
        if hotload is False:
            body["hotload"] = None
        elif isinstance(hotload, HotloadOptions):
            body["hotload"] = hotload.model_dump()
        return self._post("save_weights_for_sampler", body)

    def hotload(
        self,
        name: str,
        *,
        checkpoint_type: str | None = None,
        options: HotloadOptions | None = None,
    ) -> APIFuture[Json]:
        """Sync the sampler snapshot `name` of this run to its sampler. The future is accepted
        once the sync is recorded; its outcome is in `service.list_weight_syncs`."""
        body: Json = {"name": name, "checkpoint_type": checkpoint_type,
                      **(options or HotloadOptions()).model_dump()}  # fmt: skip
        return self._post("hotload", body)

    def save_weights_and_get_sampling_client(
        self, name: str, *, timeout: float | None = 300.0
    ) -> SamplingClient:
        """Save sampler weights and return a sampling client pinned to them."""
        saved = self.save_weights_for_sampler(name).result(timeout)
        return SamplingClient(
            self.service, sampler_id=self.sampler_id, checkpoint_uri=saved["path"]
        )

    def sampling_client(self) -> SamplingClient:
        """The run's sampler, following the latest weights."""
        return SamplingClient(self.service, sampler_id=self.sampler_id, checkpoint_uri=None)


class SamplingClient:
    def __init__(
        self, service: ServiceClient, *, sampler_id: str, checkpoint_uri: str | None
    ) -> None:
        self.service = service
        self.sampler_id = sampler_id
        self.checkpoint_uri = checkpoint_uri

    def sample(
        self,
        prompt: str | None = None,
        *,
        prompt_tokens: Sequence[int] | None = None,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        affinity_key: str | None = None,
        min_weights_version: int | None = None,
        min_weights_wait_s: float = 60.0,
        prompt_logprobs: bool = False,
        prompt_logprobs_last_n: int | None = None,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        record_stability_info: bool = False,
    ) -> APIFuture[Json]:
        """Result: {prompt_tokens, sequences: [{tokens, text, logprobs, stop_reason}], and the
        weights version that produced them, prompt_cache_hit_tokens}. `min_weights_version`:
        only weights of that sync or later (the sampler waits up to `min_weights_wait_s`, then
        the request is rejected). `topk_*_logprobs`: the k most likely tokens per position.
        `record_stability_info`: each sequence gets a `sequence_id` to train on it with
        stable_reinforce (name it in a datum's `loss_fn_input_spans`)."""
        body = {
            "prompt": prompt,
            "prompt_tokens": list(prompt_tokens) if prompt_tokens is not None else None,
            "num_samples": num_samples,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "stop": list(stop) if stop is not None else None,
            "checkpoint_uri": self.checkpoint_uri,
            "affinity_key": affinity_key,
            "prompt_logprobs": prompt_logprobs,
            "prompt_logprobs_last_n": prompt_logprobs_last_n,
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": topk_sample_logprobs,
            "record_stability_info": record_stability_info,
        }
        if min_weights_version is not None:
            body["min_weights_version"] = min_weights_version
            body["min_weights_wait_s"] = min_weights_wait_s
        return self.service._submit(f"/v1/loops/samplers/{self.sampler_id}/sample", body, _identity)
