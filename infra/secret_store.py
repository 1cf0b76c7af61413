"""Secret values at rest: AES-256-GCM in PostgreSQL, outside the read schema.

The event log only says that a version of a named secret exists (events/secrets.py); the value
is here, encrypted under a key derived from `settings.secrets_kek`, with a random 96-bit nonce
per value and (workspace, name, version) as associated data, so a ciphertext copied to another
row, name or version does not decrypt. The tables live in `<read_schema>_secrets`, a schema no
projection owns, so a replay (which rebuilds and swaps the read schema) never touches them.
They are created on first use (`create table if not exists`, as the Tinker heartbeat rows are):
they are not a projection of the log, so no migration chain or replay check applies to them.

- `secret_heads`: per (workspace, name) the last version handed out. Versions are allocated
  here atomically, so two concurrent updates never share one; the aggregate checks they move on.
- `secret_values`: one row per stored version. A row is `confirmed` once the log accepted its
  command; only confirmed rows resolve. Confirming a version destroys older ones, and a delete
  destroys every row of the name: the ciphertext is gone, not marked.

Only server-side code calls `resolve_secret` (workers, the weights mirror); no API returns a
value after creation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from infra.settings import Settings, checked_identifier
from infra.side_tables import ensure_side_tables

NONCE_BYTES = 12  # AES-GCM's standard nonce; random per value, never reused under one key
MAX_VALUE_BYTES = 64 * 1024  # a token, a credentials JSON; not a file store


class SecretNotFound(LookupError):
    pass


class SecretUnreadable(ValueError):
    """The ciphertext does not decrypt: another KEK, or a row that was tampered with."""


# --- keys, digests and encryption (pure) -------------------------------------------------------


def _subkey(kek: bytes, purpose: bytes) -> bytes:
    # One KEK, separate keys per use: the digest key never encrypts, the encryption key never
    # signs (HMAC-SHA256 as a PRF, as HKDF-Expand does with one block).
    return hmac.new(kek, b"loopstream secrets v1: " + purpose, hashlib.sha256).digest()


def associated_data(*, workspace_id: str, name: str, version: int) -> bytes:
    return json.dumps([workspace_id, name, version], separators=(",", ":")).encode()


def value_digest(kek: bytes, *, workspace_id: str, name: str, value: str) -> str:
    """HMAC-SHA256 of the value under a server key: a low-entropy value cannot be guessed from
    the log by hashing candidates, and the same value in two places gives two digests."""
    message = associated_data(workspace_id=workspace_id, name=name, version=0) + value.encode()
    return hmac.new(_subkey(kek, b"digest"), message, hashlib.sha256).hexdigest()


def encrypt(kek: bytes, *, workspace_id: str, name: str, version: int, value: str) -> bytes:
    """nonce || ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    aad = associated_data(workspace_id=workspace_id, name=name, version=version)
    return nonce + AESGCM(_subkey(kek, b"encryption")).encrypt(nonce, value.encode(), aad)


def decrypt(kek: bytes, *, workspace_id: str, name: str, version: int, sealed: bytes) -> str:
    aad = associated_data(workspace_id=workspace_id, name=name, version=version)
    nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        plain = AESGCM(_subkey(kek, b"encryption")).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise SecretUnreadable(
            f"secret {name} (version {version}) does not decrypt: wrong secrets_kek, or the "
            "stored row was altered"
        ) from None
    return plain.decode()


# --- the tables -------------------------------------------------------------------------------


def schema_of(settings: Settings) -> str:
    return checked_identifier(f"{settings.read_schema}_secrets")


def ensure_tables(conn: psycopg.Connection[Any], settings: Settings) -> None:
    schema = schema_of(settings)
    ensure_side_tables(
        conn,
        conninfo=settings.pg_conninfo,
        schema=schema,
        ddl=(
            f"create table if not exists {schema}.secret_heads ("
            "workspace_id text not null, name text not null, "
            "last_version integer not null, created_at timestamptz, "
            "primary key (workspace_id, name))",
            f"create table if not exists {schema}.secret_values ("
            "workspace_id text not null, name text not null, version integer not null, "
            "sealed bytea not null, stored_at timestamptz not null default now(), "
            "confirmed_at timestamptz, "
            "primary key (workspace_id, name, version))",
        ),
    )


@dataclass(frozen=True)
class SecretInfo:
    """What a listing shows: never a value, never a digest."""

    name: str
    version: int
    created_at: datetime | None
    updated_at: datetime


class SecretStore:
    """The rows of one PostgreSQL connection (autocommit: each call is its own transaction)."""

    def __init__(self, conn: psycopg.Connection[Any], settings: Settings) -> None:
        ensure_tables(conn, settings)
        self.conn = conn
        self.kek = settings.secrets_kek_bytes
        self.schema = schema_of(settings)

    def next_version(self, workspace_id: str, name: str) -> int:
        row = self.conn.execute(
            f"insert into {self.schema}.secret_heads as h (workspace_id, name, last_version) "
            "values (%s, %s, 1) on conflict (workspace_id, name) "
            "do update set last_version = h.last_version + 1 returning last_version",
            (workspace_id, name),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def store(self, workspace_id: str, name: str, version: int, value: str) -> str:
        """Encrypt and store an unconfirmed version; its digest (for the command)."""
        sealed = encrypt(
            self.kek, workspace_id=workspace_id, name=name, version=version, value=value
        )
        self.conn.execute(
            f"insert into {self.schema}.secret_values (workspace_id, name, version, sealed) "
            "values (%s, %s, %s, %s)",
            (workspace_id, name, version, sealed),
        )
        return value_digest(self.kek, workspace_id=workspace_id, name=name, value=value)

    def confirm(self, workspace_id: str, name: str, version: int, *, created: bool) -> None:
        """The log accepted `version`: it resolves from now on, and older versions are gone."""
        with self.conn.transaction():
            self.conn.execute(
                f"update {self.schema}.secret_values set confirmed_at = now() "
                "where workspace_id = %s and name = %s and version = %s",
                (workspace_id, name, version),
            )
            self.conn.execute(
                f"delete from {self.schema}.secret_values "
                "where workspace_id = %s and name = %s and version < %s",
                (workspace_id, name, version),
            )
            if created:
                self.conn.execute(
                    f"update {self.schema}.secret_heads set created_at = now() "
                    "where workspace_id = %s and name = %s",
                    (workspace_id, name),
                )

    def discard(self, workspace_id: str, name: str, version: int) -> None:
        """The log refused `version` (or never answered): its value must not linger. The
        version is handed out again unless a later one was allocated meanwhile (versions only
        need to move forward; this keeps them contiguous in the common case)."""
        with self.conn.transaction():
            self.conn.execute(
                f"delete from {self.schema}.secret_values "
                "where workspace_id = %s and name = %s and version = %s",
                (workspace_id, name, version),
            )
            self.conn.execute(
                f"update {self.schema}.secret_heads set last_version = last_version - 1 "
                "where workspace_id = %s and name = %s and last_version = %s",
                (workspace_id, name, version),
            )

    def destroy(self, workspace_id: str, name: str) -> int:
        """Delete every stored version of the name (for real: the rows are gone); how many."""
        with self.conn.transaction():
            cursor = self.conn.execute(
                f"delete from {self.schema}.secret_values where workspace_id = %s and name = %s",
                (workspace_id, name),
            )
            self.conn.execute(
                f"update {self.schema}.secret_heads set created_at = null "
                "where workspace_id = %s and name = %s",
                (workspace_id, name),
            )
        return cursor.rowcount

    def listing(self, workspace_id: str) -> list[SecretInfo]:
        rows = self.conn.execute(
            f"select distinct on (v.name) v.name, v.version, h.created_at, v.confirmed_at "
            f"from {self.schema}.secret_values v join {self.schema}.secret_heads h "
            "using (workspace_id, name) "
            "where v.workspace_id = %s and v.confirmed_at is not null "
            "order by v.name, v.version desc",
            (workspace_id,),
        ).fetchall()
        return [SecretInfo(name=r[0], version=r[1], created_at=r[2], updated_at=r[3]) for r in rows]

    def current(self, workspace_id: str, name: str) -> SecretInfo | None:
        found = [s for s in self.listing(workspace_id) if s.name == name]
        return found[0] if found else None

    def reveal(self, workspace_id: str, name: str) -> str:
        row = self.conn.execute(
            f"select version, sealed from {self.schema}.secret_values "
            "where workspace_id = %s and name = %s and confirmed_at is not null "
            "order by version desc limit 1",
            (workspace_id, name),
        ).fetchone()
        if row is None:
            raise SecretNotFound(f"secret {name} does not exist in workspace {workspace_id}")
        version, sealed = row
        return decrypt(
            self.kek, workspace_id=workspace_id, name=name, version=version, sealed=bytes(sealed)
        )


def resolve_secret(settings: Settings, workspace_id: str, name: str) -> str:
    """The current value of a workspace's secret, for server-side code only (a worker fetching
    weights with `auth_secret_name`). Raises SecretNotFound or SecretUnreadable."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        return SecretStore(conn, settings).reveal(workspace_id, name)
