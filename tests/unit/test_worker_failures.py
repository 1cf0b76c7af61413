"""Whose fault a failed transfer is, and the bounded retries of infrastructure failures."""

from __future__ import annotations

import pytest
import urllib3
from minio.error import S3Error, ServerError

from gpu_workers.checkpoint_store import CheckpointNotFoundError
from gpu_workers.failures import (
    InfrastructureError,
    RetryPolicy,
    category_of,
    is_transient,
    with_retries,
)
from gpu_workers.manifest import ChecksumMismatchError


def _s3_error(code: str, status: int) -> S3Error:
    response = urllib3.HTTPResponse(status=status)
    return S3Error(response, code, "message", "/bucket/key", "req", "host")


def test_store_outages_are_transient_and_server_errors() -> None:
    outages: list[Exception] = [
        _s3_error("InternalError", 500),
        _s3_error("ServiceUnavailable", 503),
        _s3_error("SlowDown", 503),
        ServerError("bad gateway", 502),
        urllib3.exceptions.MaxRetryError(None, "/x", reason=ConnectionRefusedError()),  # type: ignore[arg-type]
        urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"),  # type: ignore[arg-type]
        ConnectionResetError(),
        TimeoutError(),
    ]
    for exc in outages:
        assert is_transient(exc), exc
        assert category_of(exc) == "server", exc


def test_missing_or_corrupt_checkpoints_are_the_users_and_not_retried() -> None:
    for exc in (
        CheckpointNotFoundError("no checkpoint at bt://loops:r/weights/x"),
        ChecksumMismatchError("model.safetensors", "sha256 differs"),
        _s3_error("NoSuchKey", 404),
    ):
        assert not is_transient(exc), exc
        assert category_of(exc) == "user", exc


def test_a_bug_is_a_server_error_but_not_retried() -> None:
    assert category_of(KeyError("x")) == "server"
    assert not is_transient(KeyError("x"))
    assert not is_transient(FileExistsError("dest not empty"))


def test_a_blip_is_retried_with_growing_delays_until_it_passes() -> None:
    slept: list[float] = []
    calls = iter([ConnectionResetError(), _s3_error("InternalError", 500), "done"])

    def flaky() -> str:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries("fetch", flaky, sleep=slept.append) == "done"
    assert slept == [0.5, 1.0]


def test_an_outage_that_outlasts_the_retries_says_it_is_retryable() -> None:
    slept: list[float] = []
    policy = RetryPolicy(attempts=4, first_delay_s=1.0, max_delay_s=3.0)

    def down() -> None:
        raise ConnectionRefusedError("store down")

    with pytest.raises(InfrastructureError) as failure:
        with_retries("downloading bt://loops:r/weights/x", down, policy=policy, sleep=slept.append)
    assert slept == [1.0, 2.0, 3.0]
    assert failure.value.attempts == 4
    assert "bt://loops:r/weights/x" in str(failure.value) and "retry" in str(failure.value)


def test_a_user_error_is_raised_at_once() -> None:
    slept: list[float] = []

    def missing() -> None:
        raise CheckpointNotFoundError("no checkpoint")

    with pytest.raises(CheckpointNotFoundError):
        with_retries("fetch", missing, sleep=slept.append)
    assert slept == []
