"""Whose fault a failed piece of work is, and retrying what may pass on a second try.

A worker answers every request it cannot do with a category (CommandResult.category):
- "user": the request itself is wrong (a checkpoint that does not exist, files that do not
  match their manifest, bad input). Sending it again changes nothing.
- "server": loopstream or what it stands on failed (the S3 store or the network down or slow,
  a bug). Not the caller's doing; the same request may pass later.

Infrastructure failures are first retried here with back-off, so a store that blips for a few
seconds costs a slower answer, not a failed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import psycopg
import urllib3.exceptions
from minio.error import InvalidResponseError, S3Error, ServerError

from gpu_workers.checkpoint_store import CheckpointNotFoundError
from gpu_workers.manifest import ChecksumMismatchError

log = logging.getLogger("loopstream.worker")

Category = Literal["user", "server"]
T = TypeVar("T")

# S3 error codes that mean "no such object": the caller named a checkpoint that is not there.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})


def is_transient(exc: BaseException) -> bool:
    """An infrastructure failure that may pass on a retry: the store answered 5xx or throttled,
    or could not be reached, or did not answer in time."""
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return status >= 500 or exc.code in ("SlowDown", "RequestTimeout", "InternalError")
    if isinstance(exc, ServerError | InvalidResponseError):
        return True
    if isinstance(exc, urllib3.exceptions.HTTPError):  # MaxRetryError, ProtocolError, timeouts
        return True
    if isinstance(exc, psycopg.OperationalError):  # PostgreSQL restarting or unreachable
        return True
    # ConnectionError and TimeoutError are OSErrors; a local FileExistsError is not transient.
    return isinstance(exc, ConnectionError | TimeoutError)


def category_of(exc: BaseException) -> Category:
    """ "user" for what the request got wrong, "server" for everything else (a store that is
    down, a store that refuses our own credentials, a bug)."""
    if isinstance(exc, CheckpointNotFoundError | ChecksumMismatchError):
        return "user"
    if isinstance(exc, S3Error) and exc.code in _NOT_FOUND_CODES:
        return "user"
    return "server"


class InfrastructureError(Exception):
    """Work that failed on infrastructure after its retries: a "server", retryable failure."""

    def __init__(self, what: str, cause: BaseException, attempts: int) -> None:
        super().__init__(
            f"{what} failed after {attempts} attempts ({type(cause).__name__}: {cause}); "
            "this is a loopstream infrastructure failure, not the request's: retry it later"
        )
        self.cause = cause
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries in all, the first included
    first_delay_s: float = 0.5  # then doubled each time: 0.5 + 1 + 2 + 4 = 7.5 s of waits
    max_delay_s: float = 8.0

    def delays(self) -> list[float]:
        return [min(self.first_delay_s * 2**i, self.max_delay_s) for i in range(self.attempts - 1)]


DEFAULT_RETRY = RetryPolicy()


def with_retries(
    what: str,
    fn: Callable[[], T],
    *,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, tried again after a transient failure; InfrastructureError once the tries are
    spent. Any other exception passes through at once (retrying a missing checkpoint is waste)."""
    delays = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise InfrastructureError(what, exc, attempt) from exc
            log.warning(
                "transient failure, retrying",
                extra={"what": what, "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"},
            )
            sleep(delays[attempt - 1])
    raise AssertionError("unreachable")  # the loop returns or raises
