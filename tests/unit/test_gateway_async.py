"""Pure parts of async predict: webhook signature, back-off, the SSRF rule, status folding,
and the projection of a request's events."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from api.gateway.webhooks import (
    WebhookRefused,
    backoff_schedule,
    check_webhook_url,
    gateway_on_loopback,
    sign,
    verify_signature,
    webhook_body,
)
from events.async_requests import (
    AsyncRequestExpired,
    AsyncRequestQueued,
    AsyncRequestStarted,
    AsyncRequestSucceeded,
    AsyncWebhookAttemptFailed,
    AsyncWebhookDelivered,
    AsyncWebhookFailed,
    fold_status,
)
from events.envelope import EventEnvelope
from projections.async_requests import project_async_request_event

IDS = {"request_id": "r1", "deployment_id": "d1", "model_id": "m1"}
AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_signature_is_hmac_sha256_of_the_raw_body_in_baseten_s_header_format() -> None:
    body = webhook_body(
        request_id="r1", model_id="m1", deployment_id="d1", at=AT, data={"x": 1}, errors=[]
    )
    expected = hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert sign("key", body) == f"v1={expected}"
    assert verify_signature("key", body, f"v1=old, v1={expected}")
    assert not verify_signature("other", body, sign("key", body))
    assert not verify_signature("key", body + b" ", sign("key", body))


def test_backoff_doubles_between_attempts_and_nothing_waits_after_the_last() -> None:
    assert backoff_schedule(3, base_s=1.0) == [1.0, 2.0]
    assert backoff_schedule(1, base_s=1.0) == []
    assert backoff_schedule(6, base_s=100.0, cap_s=300.0) == [100.0, 200.0, 300.0, 300.0, 300.0]


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "https://", "not a url", "http:///x", "http://h:99999/"]
)
def test_a_webhook_must_be_http_or_https_with_a_host(url: str) -> None:
    with pytest.raises(WebhookRefused, match="webhook_endpoint"):
        check_webhook_url(url, allow_private=True)


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.1.2.3", "::1", "::ffff:127.0.0.1", "100.64.0.1"]
)
def test_private_targets_are_refused_unless_the_gateway_is_on_loopback(address: str) -> None:
    with pytest.raises(WebhookRefused, match="private"):
        check_webhook_url("https://hook.example/x", allow_private=False, addresses=[address])
    check_webhook_url("https://hook.example/x", allow_private=True, addresses=[address])
    check_webhook_url("https://hook.example/x", allow_private=False, addresses=["93.184.216.34"])
    assert gateway_on_loopback("127.0.0.1") and gateway_on_loopback("localhost")
    assert not gateway_on_loopback("0.0.0.0")


@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "::ffff:169.254.169.254"])
def test_link_local_targets_are_refused_even_from_a_gateway_on_loopback(address: str) -> None:
    for allow_private in (True, False):
        with pytest.raises(WebhookRefused, match="link-local"):
            check_webhook_url("https://hook.example/x", allow_private=allow_private,
                              addresses=[address])  # fmt: skip


def _queued() -> AsyncRequestQueued:
    return AsyncRequestQueued(
        **IDS,
        priority=1,
        max_time_in_queue_seconds=600,
        webhook_endpoint="https://h/x",
        submitted_at=AT,
        source_partition=0,
        source_offset=0,
    )


def test_status_folds_to_baseten_s_names() -> None:
    started = AsyncRequestStarted(**IDS, queued_ms=1)
    succeeded = AsyncRequestSucceeded(
        **IDS, output_key="k", output_bytes=1, output_sha256="x", predict_ms=1
    )
    attempt = AsyncWebhookAttemptFailed(**IDS, attempt=1, error="HTTP 500", retry_in_s=1)
    assert fold_status([_queued()]) == "QUEUED"
    assert fold_status([_queued(), started]) == "IN_PROGRESS"
    assert fold_status([_queued(), started, succeeded, attempt]) == "SUCCEEDED"
    delivered = AsyncWebhookDelivered(**IDS, attempts=2, status_code=200)
    assert fold_status([_queued(), started, succeeded, attempt, delivered]) == "SUCCEEDED"
    failed = AsyncWebhookFailed(**IDS, attempts=3, last_error="HTTP 500")
    assert fold_status([_queued(), started, succeeded, failed]) == "WEBHOOK_FAILED"
    assert fold_status([_queued(), AsyncRequestExpired(**IDS, queued_s=700)]) == "EXPIRED"


def _envelope(sequence: int) -> EventEnvelope:
    return EventEnvelope(
        event_id=f"e{sequence}",
        type="x",
        schema_version=1,
        aggregate_type="async_request",
        aggregate_id="r1",
        sequence=sequence,
        occurred_at=AT,
        workspace_id="ws",
        payload={},
    )


def test_the_projection_versions_rows_by_the_request_s_sequence() -> None:
    (created,) = project_async_request_event(_queued(), _envelope(1))
    assert created.creates and created.version == 1
    assert created.values["status"] == "QUEUED" and created.values["workspace_id"] == "ws"
    assert created.values["webhook_status"] == "PENDING"
    attempt = AsyncWebhookAttemptFailed(**IDS, attempt=2, error="HTTP 500", retry_in_s=None)
    (update,) = project_async_request_event(attempt, _envelope(5))
    assert not update.creates and update.version == 5
    assert update.values["webhook_attempts"] == 2 and "status" not in update.values
