"""Async predict on the gateway (seed 003; Baseten's async API): submit, status, and the worker.

    POST /model/{model_id}/deployment/{deployment_id}/async_predict   -> 201 {"request_id"}
    POST /model/{model_id}/development/async_predict
    GET  /async_request/{request_id}                  (and /model/{model_id}/async_request/...)

Submit validates, then produces an `AsyncRequestSubmitted` record to `async-requests` (keyed by
deployment id; idempotent producer, acks=all) and answers only once the broker has it: an
accepted request survives a kill -9 of the gateway right after the answer.

The worker (one per gateway process, a consumer group shared by all gateways of the topic
prefix, so partitions are split between them) reads the topic, writes the request's events (it
is their single writer: `events/async_requests.py`), queues requests by (priority, submit time),
runs up to `gateway_async_concurrency` at once through `call_replica(priority="async")` (so a
waiting sync request always takes a freed slot first), stores the output in S3, calls the
webhook with retries, and only then lets the group offset move past the record. A gateway that
dies redoes its unfinished requests on restart (at-least-once: a webhook may come twice; its
`request_id` lets the receiver drop the repeat). Garbage on the topic is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from fastapi import APIRouter, FastAPI, Request, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text

from api.auth import InferCaller
from api.deploy_queries import DeploymentReadDep, DeploymentReads
from api.errors import ApiError, not_found
from api.gateway.models import PredictInput, PredictOutput
from api.gateway.webhooks import (
    SIGNATURE_HEADER,
    WebhookRefused,
    backoff_schedule,
    check_webhook_url,
    gateway_on_loopback,
    sign,
    webhook_body,
)
from events.async_requests import (
    DEFAULT_QUEUE_S,
    MAX_QUEUE_S,
    MAX_WEBHOOK_URL,
    MIN_QUEUE_S,
    SIGNING_SECRET_NAME,
    AsyncRequestEvent,
    AsyncRequestExpired,
    AsyncRequestFailed,
    AsyncRequestQueued,
    AsyncRequestStarted,
    AsyncRequestSubmitted,
    AsyncRequestSucceeded,
    AsyncWebhookAttemptFailed,
    AsyncWebhookDelivered,
    AsyncWebhookFailed,
    ErrorCode,
)
from events.envelope import EventEnvelope, utc_now
from events.ids import new_event_id, uuid7
from events.kafka_log import consumer_config, producer_config
from events.transactional import dead_letter
from infra.settings import Settings

log = logging.getLogger("loopstream.gateway.async")

WORKER = "gateway-async"
# Records read but not finished, per gateway, before it stops reading (paused partitions).
MAX_BUFFERED = 10_000
# How long the worker waits for the projection before it trusts the read model's view of a
# request a predecessor may have begun (its events' sequence continues from there).
CATCH_UP_WAIT_S = 15.0


# --- the API ------------------------------------------------------------------------------------


class AsyncPredictInput(BaseModel):
    """Baseten's async_predict body."""

    model_config = ConfigDict(extra="forbid")

    model_input: PredictInput
    webhook_endpoint: str | None = Field(default=None, min_length=1, max_length=MAX_WEBHOOK_URL)
    priority: int = Field(default=1, ge=0, le=2, description="0 runs first; default 1")
    max_time_in_queue_seconds: int = Field(
        default=DEFAULT_QUEUE_S,
        ge=MIN_QUEUE_S,
        le=MAX_QUEUE_S,
        description="a request still queued after this long is EXPIRED, never run",
    )


class AsyncPredictAccepted(BaseModel):
    request_id: str


class AsyncRequestError(BaseModel):
    code: str
    message: str


class AsyncRequestPublic(BaseModel):
    request_id: str
    model_id: str
    deployment_id: str
    status: str = Field(
        description="QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, EXPIRED, WEBHOOK_FAILED"
    )
    webhook_status: str = Field(description="PENDING, SUCCEEDED, FAILED, NO_WEBHOOK_PROVIDED")
    webhook_attempts: int
    webhook_last_error: str | None
    priority: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    status_at: datetime
    errors: list[AsyncRequestError]
    output: dict[str, Any] | None = Field(description="the predict output, once SUCCEEDED")


_WEBHOOK_STATUS = {
    "NONE": "NO_WEBHOOK_PROVIDED",
    "PENDING": "PENDING",
    "DELIVERED": "SUCCEEDED",
    "FAILED": "FAILED",
}

router = APIRouter(tags=["async predict"])


def worker_of(request: Request) -> AsyncWorker:
    worker: AsyncWorker | None = getattr(request.app.state, "async_worker", None)
    if worker is None or not worker.started:
        raise ApiError(status.HTTP_503_SERVICE_UNAVAILABLE, "async requests are not served yet")
    return worker


async def _submit(
    request: Request,
    reads: DeploymentReads,
    caller_workspace: str,
    actor: str,
    model_id: str,
    deployment_id: str | None,
    body: AsyncPredictInput,
) -> AsyncPredictAccepted:
    from api.gateway.app import resolve

    worker = worker_of(request)
    target = await asyncio.to_thread(
        resolve, request, reads, caller_workspace, model_id, deployment_id
    )
    if body.webhook_endpoint is not None:
        await asyncio.to_thread(worker.check_webhook, body.webhook_endpoint, target.workspace_id)
    record = AsyncRequestSubmitted(
        request_id=uuid7().hex,
        workspace_id=target.workspace_id,
        model_id=model_id,
        deployment_id=target.deployment_id,
        model_input=body.model_input.for_replica(),
        webhook_endpoint=body.webhook_endpoint,
        priority=body.priority,
        max_time_in_queue_seconds=body.max_time_in_queue_seconds,
        submitted_at=utc_now(),
        actor=actor,
    )
    try:
        await worker.produce(
            worker.topic, key=target.deployment_id.encode(), value=record.model_dump_json().encode()
        )
    except KafkaException as exc:
        raise ApiError(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the request was not queued ({exc}); retry"
        ) from None
    return AsyncPredictAccepted(request_id=record.request_id)


@router.post("/model/{model_id}/deployment/{deployment_id}/async_predict", status_code=201)
async def async_predict_deployment(
    request: Request,
    model_id: str,
    deployment_id: str,
    body: AsyncPredictInput,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> AsyncPredictAccepted:
    """Queue a prediction on one deployment; the result comes by webhook (and status)."""
    return await _submit(
        request, reads, caller.workspace_id, caller.key_id, model_id, deployment_id, body
    )


@router.post("/model/{model_id}/development/async_predict", status_code=201)
async def async_predict_development(
    request: Request,
    model_id: str,
    body: AsyncPredictInput,
    caller: InferCaller,
    reads: DeploymentReadDep,
) -> AsyncPredictAccepted:
    """Queue a prediction on the model's development deployment."""
    return await _submit(request, reads, caller.workspace_id, caller.key_id, model_id, None, body)


async def _status(
    request: Request, workspace: str, request_id: str, model_id: str | None
) -> AsyncRequestPublic:
    worker = worker_of(request)
    row = await asyncio.to_thread(worker.row, request_id, workspace=workspace, catch_up=True)
    if row is None or (model_id is not None and row["model_id"] != model_id):
        raise not_found(f"async request {request_id} not found", field="request_id")
    output = None
    if row["status"] in ("SUCCEEDED", "WEBHOOK_FAILED") and row["output_key"]:
        output = await asyncio.to_thread(worker.load_output, row["output_key"])
    errors = []
    if row["error_code"]:
        errors.append(AsyncRequestError(code=row["error_code"], message=row["error"] or ""))
    return AsyncRequestPublic(
        request_id=row["request_id"],
        model_id=row["model_id"],
        deployment_id=row["deployment_id"],
        status=row["status"],
        webhook_status=_WEBHOOK_STATUS[row["webhook_status"]],
        webhook_attempts=row["webhook_attempts"],
        webhook_last_error=row["webhook_last_error"],
        priority=row["priority"],
        created_at=row["submitted_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        status_at=row["updated_at"],
        errors=errors,
        output=output,
    )


@router.get("/async_request/{request_id}")
async def async_request_status(
    request: Request, request_id: str, caller: InferCaller
) -> AsyncRequestPublic:
    """Status of an async request of the caller's workspace (another's is a 404)."""
    return await _status(request, caller.workspace_id, request_id, None)


@router.get("/model/{model_id}/async_request/{request_id}")
async def model_async_request_status(
    request: Request, model_id: str, request_id: str, caller: InferCaller
) -> AsyncRequestPublic:
    """Status of an async request of the model."""
    return await _status(request, caller.workspace_id, request_id, model_id)


# --- the worker ---------------------------------------------------------------------------------


@dataclass(order=True)
class _Queued:
    priority: int
    submitted_ts: float
    offset: int
    partition: int = field(compare=False)
    generation: int = field(compare=False)
    record: AsyncRequestSubmitted = field(compare=False)
    sequence: int = field(compare=False)  # of the request's last event
    resume: dict[str, Any] | None = field(compare=False)  # its row, when a predecessor began it


class AsyncWorker:
    """The async queue of one gateway process (see the module docstring)."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.topic = settings.topic("async-requests")
        self.started = False
        self.gateway_id = f"{socket.gethostname()}-{settings.gateway_port}"
        self.allow_private = gateway_on_loopback(settings.gateway_host)
        self._stop = threading.Event()
        self._done: queue.Queue[tuple[int, int, int]] = queue.Queue()  # partition, gen, offset
        self._generation: dict[int, int] = {}  # partition -> assignment count, consumer thread
        self._caught_up: dict[tuple[int, int], asyncio.Task[bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._threads: list[threading.Thread] = []

    # --- life ---

    async def start(self) -> None:
        from infra.s3 import ObjectStore

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.PriorityQueue[_Queued] = asyncio.PriorityQueue()
        self.producer = Producer(producer_config(self.settings))
        self.store = ObjectStore.from_settings(self.settings)
        self.http = httpx.AsyncClient(
            timeout=self.settings.gateway_webhook_timeout_s, follow_redirects=False
        )
        self.engine = self.app.state.gateway.pool.engine
        self.schema = self.settings.read_schema
        self._threads = [
            threading.Thread(target=self._poll_producer, name="async-produce", daemon=True),
            threading.Thread(target=self._consume, name="async-consume", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._tasks = [
            asyncio.create_task(self._run_forever(i))
            for i in range(self.settings.gateway_async_concurrency)
        ]
        self.started = True

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self._join)
        await self.http.aclose()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=15)
        self.producer.flush(10)

    # --- Kafka: producing ---

    def _poll_producer(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def produce(
        self, topic: str, *, key: bytes, value: bytes, headers: Any = None
    ) -> asyncio.Future[None]:
        """Produce one record; the future settles once the broker has it (acks=all)."""
        future: asyncio.Future[None] = self.loop.create_future()

        def settle(err: Any, _msg: Any) -> None:
            if future.done():
                return
            if err is not None:
                future.set_exception(KafkaException(err))
            else:
                future.set_result(None)

        def delivered(err: Any, msg: Any) -> None:
            self.loop.call_soon_threadsafe(settle, err, msg)

        self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
        return future

    async def emit(self, item: _Queued, event: AsyncRequestEvent) -> None:
        """Write the request's next event, retried until the broker has it: what happened to a
        request must be recorded before the worker goes on (the sequence stays gap-free)."""
        record = item.record
        envelope = EventEnvelope(
            event_id=new_event_id(),
            type=type(event).__name__,
            schema_version=event.schema_version,
            aggregate_type="async_request",
            aggregate_id=record.request_id,
            sequence=item.sequence + 1,
            occurred_at=utc_now(),
            causation_id=record.request_id,
            correlation_id=record.request_id,
            actor=f"{WORKER}:{self.gateway_id}",
            workspace_id=record.workspace_id,
            payload=event.model_dump(mode="json"),
        )
        delay = 0.2
        while True:
            try:
                await self.produce(
                    self.settings.topic("events"),
                    key=record.request_id.encode(),
                    value=envelope.to_bytes(),
                    headers=envelope.kafka_headers(),
                )
                break
            except (KafkaException, BufferError) as exc:
                log.warning("event not written yet; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        item.sequence += 1

    # --- Kafka: consuming (one thread owns the consumer and the offsets) ---

    def _consume(self) -> None:
        consumer = Consumer(
            consumer_config(
                self.settings,
                group_id=f"{self.settings.topic_prefix}.{WORKER}",
                # Static membership: a restarted gateway takes its partitions back at once
                # instead of after the dead member's session timeout.
                **{
                    "group.instance.id": f"{WORKER}-{self.gateway_id}",
                    "session.timeout.ms": 10_000,
                },
            )
        )
        open_: dict[int, set[int]] = {}  # partition -> offsets read and not finished
        high: dict[int, int] = {}  # partition -> next offset to read

        def assigned(_c: Consumer, partitions: list[TopicPartition]) -> None:
            for tp in partitions:
                self._generation[tp.partition] = self._generation.get(tp.partition, 0) + 1
                open_[tp.partition] = set()
                high.pop(tp.partition, None)

        def revoked(_c: Consumer, partitions: list[TopicPartition]) -> None:
            for tp in partitions:  # queued records of these partitions are dropped, not run
                self._generation[tp.partition] = self._generation.get(tp.partition, 0) + 1
                open_.pop(tp.partition, None)
                high.pop(tp.partition, None)

        consumer.subscribe([self.topic], on_assign=assigned, on_revoke=revoked, on_lost=revoked)
        paused = False
        try:
            while not self._stop.is_set():
                self._commit_finished(consumer, open_, high)
                buffered = sum(len(s) for s in open_.values())
                if not paused and buffered >= MAX_BUFFERED:
                    consumer.pause(consumer.assignment())
                    paused = True
                elif paused and buffered < MAX_BUFFERED // 2:
                    consumer.resume(consumer.assignment())
                    paused = False
                message = consumer.poll(0.2)
                if message is None or message.error() is not None:
                    continue
                partition, offset = _position(message)
                open_.setdefault(partition, set()).add(offset)
                high[partition] = offset + 1
                generation = self._generation.get(partition, 0)
                self.loop.call_soon_threadsafe(self._admit_soon, message, generation)
        except Exception:
            log.exception("async consumer stopped")
        finally:
            with contextlib.suppress(Exception):
                self._commit_finished(consumer, open_, high)
            consumer.close()

    def _commit_finished(
        self, consumer: Consumer, open_: dict[int, set[int]], high: dict[int, int]
    ) -> None:
        moved: set[int] = set()
        while True:
            try:
                partition, generation, offset = self._done.get_nowait()
            except queue.Empty:
                break
            if self._generation.get(partition) == generation and partition in open_:
                open_[partition].discard(offset)
                moved.add(partition)
        offsets = [
            TopicPartition(self.topic, p, min(open_[p]) if open_[p] else high[p])
            for p in moved
            if p in high
        ]
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # committed later with the next finished one
                log.warning("offset commit failed", extra={"error": str(exc)})

    def _finished(self, item_or_msg: _Queued | tuple[int, int, int]) -> None:
        if isinstance(item_or_msg, _Queued):
            self._done.put((item_or_msg.partition, item_or_msg.generation, item_or_msg.offset))
        else:
            self._done.put(item_or_msg)

    # --- admitting a record into the queue ---

    def _admit_soon(self, message: Message, generation: int) -> None:
        task = asyncio.create_task(self._admit(message, generation))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _admit(self, message: Message, generation: int) -> None:
        partition, offset = _position(message)
        try:
            record = AsyncRequestSubmitted.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            dead_letter(
                self.producer,
                self.settings.topic("async-requests.dlq"),
                message,
                f"invalid async request: {reason}"[:2000],
            )
            self._finished((partition, generation, offset))
            return
        try:
            await self._caught_up_once(partition, generation)
            row = await asyncio.to_thread(self.row, record.request_id)
            item = _Queued(
                priority=record.priority,
                submitted_ts=record.submitted_at.timestamp(),
                offset=offset,
                partition=partition,
                generation=generation,
                record=record,
                sequence=row["version"] if row else 0,
                resume=row,
            )
            if row is None:
                await self.emit(
                    item,
                    AsyncRequestQueued(
                        **_ids(record),
                        priority=record.priority,
                        max_time_in_queue_seconds=record.max_time_in_queue_seconds,
                        webhook_endpoint=record.webhook_endpoint,
                        submitted_at=record.submitted_at,
                        source_partition=partition,
                        source_offset=offset,
                    ),
                )
            await self.queue.put(item)
        except Exception:  # the database away: leave it unfinished, a restart redoes it
            log.exception("async request not admitted", extra={"request_id": record.request_id})

    async def _caught_up_once(self, partition: int, generation: int) -> None:
        """Once per partition assignment: let the projection apply what a predecessor wrote, so
        the read model knows how far it got with the requests redone here."""
        from projections.health import wait_until_caught_up

        key = (partition, generation)
        if key not in self._caught_up:
            self._caught_up[key] = asyncio.create_task(
                asyncio.to_thread(
                    wait_until_caught_up,  # type: ignore[arg-type]
                    self.settings,
                    self.engine,
                    self.schema,
                    timeout_s=CATCH_UP_WAIT_S,
                )  # type: ignore[arg-type]
            )
        await self._caught_up[key]

    # --- running requests ---

    async def _run_forever(self, _n: int) -> None:
        while True:
            item = await self.queue.get()
            if self._generation.get(item.partition) != item.generation:
                continue  # its partition moved to another gateway, which runs it
            try:
                await self._run(item)
                self._finished(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop the worker; left unfinished, a restart redoes it
                log.exception(
                    "async request failed in the worker",
                    extra={"request_id": item.record.request_id},
                )

    async def _run(self, item: _Queued) -> None:
        record, resume = item.record, item.resume
        done = resume is not None and resume["status"] not in ("QUEUED", "IN_PROGRESS")
        if (
            done
            and resume is not None
            and resume["webhook_status"] in ("NONE", "DELIVERED", "FAILED")
        ):
            return  # a predecessor finished it and died before moving the offset
        if done and resume is not None:
            output, errors = await self._recorded_outcome(resume)
        else:
            output, errors = await self._predict(item)
        if record.webhook_endpoint is not None:
            await self._deliver(item, output, errors)

    async def _predict(self, item: _Queued) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
        record = item.record
        queued_s = time.time() - item.submitted_ts
        if queued_s > record.max_time_in_queue_seconds:
            await self.emit(item, AsyncRequestExpired(**_ids(record), queued_s=queued_s))
            return None, [
                {
                    "code": "REQUEST_EXPIRED",
                    "message": f"waited {queued_s:.1f} s in the queue, past "
                    f"max_time_in_queue_seconds ({record.max_time_in_queue_seconds})",
                }
            ]
        await self.emit(item, AsyncRequestStarted(**_ids(record), queued_ms=queued_s * 1000))
        started = time.perf_counter()
        try:
            output = await self._call_model(record)
        except ApiError as exc:
            code = _error_code(exc.status_code)
            await self.emit(
                item,
                AsyncRequestFailed(
                    **_ids(record), code=code, status_code=exc.status_code, error=exc.detail[:2000]
                ),
            )
            return None, [{"code": code, "message": exc.detail}]
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"[:2000]
            await self.emit(
                item,
                AsyncRequestFailed(
                    **_ids(record), code="MODEL_PREDICT_ERROR", status_code=500, error=message
                ),
            )
            return None, [{"code": "MODEL_PREDICT_ERROR", "message": message}]
        data = json.dumps(output, separators=(",", ":")).encode()
        key = f"async-results/{record.workspace_id}/{record.request_id}.json"
        await asyncio.to_thread(self.store.put_bytes, key, data, "application/json")
        await self.emit(
            item,
            AsyncRequestSucceeded(
                **_ids(record),
                replica_id=output.get("replica_id"),
                output_key=key,
                output_bytes=len(data),
                output_sha256=hashlib.sha256(data).hexdigest(),
                predict_ms=(time.perf_counter() - started) * 1000,
            ),
        )
        return output, []

    async def _call_model(self, record: AsyncRequestSubmitted) -> dict[str, Any]:
        from api.gateway.app import call_replica, resolve

        # The routes' functions want a request: this one carries the app, and nothing else.
        request = Request({"type": "http", "app": self.app, "headers": [], "method": "POST"})
        reads = DeploymentReads(self.engine, self.schema)
        try:
            target = await asyncio.to_thread(
                resolve, request, reads, record.workspace_id, record.model_id, record.deployment_id
            )
        except ApiError as exc:
            raise ApiError(404, exc.detail) from None  # deactivated or deleted since the submit
        answer = await call_replica(
            request, target, record.model_input, route="async_predict", priority="async"
        )
        fields = {k: v for k, v in answer.items() if k in PredictOutput.model_fields}
        return PredictOutput(
            model_id=record.model_id, deployment_id=target.deployment_id, **fields
        ).model_dump(mode="json")

    async def _recorded_outcome(
        self, row: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
        if row["output_key"]:
            return await asyncio.to_thread(self.load_output, row["output_key"]), []
        return None, [
            {"code": row["error_code"] or "MODEL_PREDICT_ERROR", "message": row["error"] or ""}
        ]

    async def _deliver(
        self, item: _Queued, output: dict[str, Any] | None, errors: list[dict[str, str]]
    ) -> None:
        from infra.secret_store import SecretNotFound, SecretUnreadable, resolve_secret

        record = item.record
        assert record.webhook_endpoint is not None
        waits = backoff_schedule(
            self.settings.gateway_webhook_attempts, base_s=self.settings.gateway_webhook_backoff_s
        )
        # A request redone after a crash goes on counting where its predecessor stopped.
        first = (item.resume or {}).get("webhook_attempts", 0) + 1
        attempts = max(self.settings.gateway_webhook_attempts, first)
        error = ""
        for attempt in range(first, attempts + 1):
            status_code: int | None = None
            try:
                key = await asyncio.to_thread(
                    resolve_secret, self.settings, record.workspace_id, SIGNING_SECRET_NAME
                )
                await asyncio.to_thread(
                    check_webhook_url, record.webhook_endpoint, allow_private=self.allow_private
                )
                body = webhook_body(
                    request_id=record.request_id,
                    model_id=record.model_id,
                    deployment_id=record.deployment_id,
                    at=utc_now(),
                    data=output,
                    errors=errors,
                )
                response = await self.http.post(
                    record.webhook_endpoint,
                    content=body,
                    headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(key, body)},
                )
                status_code = response.status_code
                if 200 <= status_code < 300:
                    await self.emit(
                        item,
                        AsyncWebhookDelivered(
                            **_ids(record), attempts=attempt, status_code=status_code
                        ),
                    )
                    return
                error = f"HTTP {status_code}: {response.text[:200]}"
            except (SecretNotFound, SecretUnreadable) as exc:
                error = f"signing key: {exc}"
            except WebhookRefused as exc:
                error = str(exc)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            retry_in = waits[min(attempt, len(waits)) - 1] if attempt < attempts else None
            await self.emit(
                item,
                AsyncWebhookAttemptFailed(
                    **_ids(record),
                    attempt=attempt,
                    status_code=status_code,
                    error=error[:2000],
                    retry_in_s=retry_in,
                ),
            )
            if retry_in is not None:
                await asyncio.sleep(retry_in)
        await self.emit(
            item, AsyncWebhookFailed(**_ids(record), attempts=attempts, last_error=error[:2000])
        )

    # --- reads ---

    def check_webhook(self, url: str, workspace_id: str) -> None:
        """At submit: the URL passes the SSRF rule and the workspace can sign (400s)."""
        from infra.secret_store import SecretStore

        try:
            check_webhook_url(url, allow_private=self.allow_private)
        except WebhookRefused as exc:
            raise ApiError(400, str(exc), field="webhook_endpoint") from None
        import psycopg

        with psycopg.connect(self.settings.pg_conninfo, autocommit=True) as conn:
            current = SecretStore(conn, self.settings).current(workspace_id, SIGNING_SECRET_NAME)
        if current is None:
            raise ApiError(
                400,
                f"webhook_endpoint: workspace {workspace_id} has no secret named "
                f"{SIGNING_SECRET_NAME!r} to sign webhooks with; create one first "
                f"(`loopstream secrets create {SIGNING_SECRET_NAME}`, or POST /v1/secrets "
                f'{{"name": "{SIGNING_SECRET_NAME}", "value": ...}}) and give your receiver '
                "the same value",
                field="webhook_endpoint",
            )

    def row(
        self, request_id: str, *, workspace: str | None = None, catch_up: bool = False
    ) -> dict[str, Any] | None:
        from projections.health import wait_until_caught_up

        query = f"select * from {self.schema}.async_requests where request_id = :id"
        if workspace is not None:
            query += " and workspace_id = :ws"
        for again in (False, True):
            with self.engine.connect() as conn:
                found = conn.execute(text(query), {"id": request_id, "ws": workspace}).first()
            if found is not None or not catch_up or again:
                return dict(found._mapping) if found is not None else None
            wait_until_caught_up(self.settings, self.engine, self.schema, timeout_s=2.0)
        return None

    def load_output(self, key: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.store.get_bytes(key))
        return loaded


def _position(message: Message) -> tuple[int, int]:
    partition, offset = message.partition(), message.offset()
    assert partition is not None and offset is not None, "a consumed record has both"
    return partition, offset


def _ids(record: AsyncRequestSubmitted) -> dict[str, str]:
    return {
        "request_id": record.request_id,
        "deployment_id": record.deployment_id,
        "model_id": record.model_id,
    }


def _error_code(status_code: int) -> ErrorCode:
    if status_code == 404:
        return "MODEL_DOES_NOT_EXIST"
    if status_code in (400, 422):
        return "MODEL_INVALID_INPUT"
    if status_code == 503:
        return "MODEL_NOT_READY"
    return "MODEL_PREDICT_ERROR"
