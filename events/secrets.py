"""Events of the secrets store: a secret's name, version and a keyed digest, never its value.

The event log is immutable and widely read (projections, audit, replays, external consumers),
so a value on it could never be taken back. The value lives encrypted in PostgreSQL
(infra/secret_store.py) and can be destroyed; the log only says that a version of a named secret
exists, and with which digest: an HMAC under the server's key, so even a short value cannot be
guessed by hashing candidates.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from events.loops import DomainEvent

# A secret's name, as the seed's `secret_keys=["hf_access_token"]` and `auth_secret_name` use it.
SECRET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
DIGEST = r"^[0-9a-f]{64}$"  # HMAC-SHA256, hex


class SecretEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "secret"

    workspace_id: str
    name: str = Field(pattern=SECRET_NAME)
    version: int = Field(ge=1, description="the value's version; counts on across a delete")


class SecretCreated(SecretEvent):
    digest: str = Field(pattern=DIGEST, description="HMAC-SHA256 of the value, server-keyed")


class SecretUpdated(SecretEvent):
    digest: str = Field(pattern=DIGEST, description="HMAC-SHA256 of the value, server-keyed")


class SecretDeleted(SecretEvent):
    """The value (every version) was destroyed; `version` is the last one it had."""


SECRETS_EVENTS: tuple[type[DomainEvent], ...] = (SecretCreated, SecretUpdated, SecretDeleted)
