"""Who is calling: API keys, their format, and the FastAPI dependencies that check them.

A key is `tml-<key_id>_<secret>`: the `tml-` prefix because the official Tinker SDK refuses any
other, the key id as the public part (it names the key in lists, audits and as every command's
actor), the secret as ~256 random bits. Only an HMAC-SHA256 of the secret under the server's
`api_key_hash_secret` is ever stored or sent on Kafka (`ApiKeyCreated.key_hash`); the key itself
is shown once, when it is made.

Look-up is by key id in the `api_keys` read model, then a constant-time comparison of the
hashes. A row read is reused for at most `api_key_cache_s` (0.25 s by default), so a revocation
takes effect within that plus its projection's lag (well under a second) while a busy client
costs one query per key per quarter second instead of one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header
from starlette import status
from starlette.concurrency import run_in_threadpool

from api.deps import ReadDep, StateDep
from api.errors import ApiError
from api.queries import ReadModels, Row

KEY_PREFIX = "tml-"
SCOPES = ("admin", "train", "infer")
# tml-<16 hex>_<url-safe secret>; a "." may separate them too (both are accepted).
_KEY = re.compile(r"^tml-(?P<key_id>[0-9a-f]{16})[._](?P<secret>[A-Za-z0-9_-]{20,200})$")


@dataclass(frozen=True)
class Caller:
    workspace_id: str
    key_id: str  # the actor of every command this caller sends
    scopes: frozenset[str]  # subset of SCOPES; admin implies all

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: `key` is shown once; `key_hash` is what gets stored."""

    key_id: str
    key: str
    prefix: str  # public: "tml-<key_id>", enough to recognise a key in a list
    key_hash: str


# --- the key format (pure) -------------------------------------------------------------------


def hash_secret(secret: str, *, hash_key: str) -> str:
    """HMAC-SHA256 of a key's secret under the server's hash key, as hex."""
    return hmac.new(hash_key.encode(), secret.encode(), hashlib.sha256).hexdigest()


def new_key(*, hash_key: str) -> IssuedKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedKey(
        key_id=key_id,
        key=f"{KEY_PREFIX}{key_id}_{secret}",
        prefix=f"{KEY_PREFIX}{key_id}",
        key_hash=hash_secret(secret, hash_key=hash_key),
    )


def parse_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY.match(key.strip())
    return (match["key_id"], match["secret"]) if match else None


def verify(secret: str, key_hash: str, *, hash_key: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, hash_key=hash_key), key_hash)


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: `Authorization: Api-Key <key>` (the seed's), `Authorization:
    Bearer <key>` (OpenAI-style clients), or `X-API-Key: <key>` (the Tinker SDK)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in ("api-key", "bearer") and value.strip():
            return value.strip()
        return ""  # present but not one of ours: malformed
    if x_api_key is not None:
        return x_api_key.strip()
    return None


# --- the dependencies ------------------------------------------------------------------------


def unauthorized(detail: str) -> ApiError:
    return ApiError(status.HTTP_401_UNAUTHORIZED, detail, field="authorization")


async def authenticate(
    state: StateDep,
    reads: ReadDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
) -> Caller:
    # async, reading the database on a worker thread only when the key's row is not fresh: this
    # runs before every route, and each sync dependency costs a threadpool hop.
    key = key_from_headers(authorization, x_api_key)
    if key is None:
        raise unauthorized(
            "no API key: send `Authorization: Api-Key <key>` (create one with "
            "`loopstream keys create`)"
        )
    parsed = parse_key(key)
    if parsed is None:
        raise unauthorized(
            "malformed API key: expected `Authorization: Api-Key tml-<key id>_<secret>`"
        )
    key_id, secret = parsed
    api_settings = state.api_settings
    row = _KEY_ROWS.fresh(reads.schema, key_id, max_age_s=api_settings.api_key_cache_s)
    if row is None:
        row = await run_in_threadpool(_KEY_ROWS.load, reads, key_id)
    # One answer for a key id nobody issued, a wrong secret and a revoked key: the caller
    # learns nothing about which key ids exist.
    if (
        row is None
        or row["revoked_at"] is not None
        or not verify(secret, row["key_hash"], hash_key=api_settings.api_key_hash_secret)
    ):
        raise unauthorized("unknown or revoked API key")
    return Caller(workspace_id=row["workspace_id"], key_id=key_id, scopes=frozenset(row["scopes"]))


class _KeyRows:
    """Issued keys' rows, each reused for at most `max_age_s`. Only issued keys are kept (an
    unknown id is asked again every time), so made-up ids cannot grow the map."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[float, Row]] = {}
        self._lock = threading.Lock()

    def fresh(self, schema: str, key_id: str, *, max_age_s: float) -> Row | None:
        with self._lock:
            cached = self._rows.get((schema, key_id))
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        return None

    def load(self, reads: ReadModels, key_id: str) -> Row | None:
        read_at = time.monotonic()
        row = reads.api_key(key_id)
        with self._lock:
            if row is None:
                self._rows.pop((reads.schema, key_id), None)
            else:
                self._rows[(reads.schema, key_id)] = (read_at, row)
        return row


_KEY_ROWS = _KeyRows()


def require_scope(scope: str) -> Callable[..., Caller]:
    """A dependency that authenticates and then insists on `scope` (admin implies all)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")

    # async: a set lookup needs no worker thread (sync dependencies each take a threadpool hop).
    async def check(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        if not caller.has(scope):
            raise ApiError(
                status.HTTP_403_FORBIDDEN,
                f"this API key lacks the `{scope}` scope (it has: "
                f"{', '.join(sorted(caller.scopes)) or 'none'})",
                field="authorization",
            )
        return caller

    return check


CallerDep = Annotated[Caller, Depends(authenticate)]
TrainCaller = Annotated[Caller, Depends(require_scope("train"))]
InferCaller = Annotated[Caller, Depends(require_scope("infer"))]
AdminCaller = Annotated[Caller, Depends(require_scope("admin"))]
