"""Settings of the REST API process: where it listens, where clients find it, and its secrets.

They live here rather than in `infra/settings.py` because only the API (and its clients) read
them; the same `LOOPSTREAM_` environment prefix applies, so one `.env` configures everything.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.settings import (
    DEV_PG_PASSWORD,
    DEV_S3_ACCESS_KEY,
    DEV_S3_SECRET_KEY,
    DEV_SECRETS_KEK,
    Settings,
)

# The development secret of the local stack. Refused on any non-loopback address, so a
# deployment cannot forget to set its own.
DEV_PAGE_TOKEN_SECRET = "loopstream-dev-page-token-secret"
DEV_API_KEY_HASH_SECRET = "loopstream-dev-api-key-hash-secret"


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOPSTREAM_", env_file=".env", extra="ignore")

    # Where `loopstream api` listens. Loopback by default: the local stack has no auth.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=18000, ge=1, le=65535)
    # Where the SDK and CLI find the API; None means http://<api_host>:<api_port>.
    api_base_url: str | None = None
    # HMAC key of the opaque checkpoint-file page tokens (tamper-evident offsets).
    page_token_secret: str = Field(default=DEV_PAGE_TOKEN_SECRET, min_length=16, repr=False)
    # HMAC key of API key hashes (only the hash of a key's secret is stored or sent on Kafka).
    # Changing it invalidates every issued key.
    api_key_hash_secret: str = Field(default=DEV_API_KEY_HASH_SECRET, min_length=16, repr=False)
    # How long an API key's row is reused before it is read again: bounds how late a revocation
    # takes effect (plus the projection's lag).
    api_key_cache_s: float = Field(default=0.25, ge=0, le=1.0)
    # How long a presigned file URL stays valid.
    presigned_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Upper bound of a futures long-poll; the Tinker SDK's long polls are of this order.
    future_max_wait_s: float = Field(default=60.0, gt=0, le=300)
    # A resource looked up by id and not found is looked up again once the read models have
    # caught up with the log, waiting at most this long: a client that was just told its
    # command was accepted finds what it created. Only misses wait, and only while behind.
    # 10 s: with the serving half beside the loops on a busy 2-core machine, the projection
    # has been seen more than 5 s behind (a fresh-clone CI run's read-your-writes test).
    read_your_writes_wait_s: float = Field(default=10.0, ge=0, le=60)
    # A request this API sent and that has no result yet answers "pending" for this long;
    # after that (or after an API restart) an unknown id answers 404 "unknown request, resubmit".
    request_retention_s: float = Field(default=900.0, gt=0)
    # Largest request body accepted (413 above it), checked while the body is read. 16 MiB
    # holds a forward_backward batch of ~64 sequences x 8k tokens as JSON (token, target,
    # weight: ~40 bytes a position) and more as Tinker protobuf; the demo sends ~20 KB.
    api_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _no_dev_secret_off_loopback(self) -> ApiSettings:
        if self.page_token_secret == DEV_PAGE_TOKEN_SECRET and not _is_loopback(self.api_host):
            raise ValueError(
                "page_token_secret: set LOOPSTREAM_PAGE_TOKEN_SECRET before listening on "
                f"{self.api_host} (the development secret is public)"
            )
        if self.api_key_hash_secret == DEV_API_KEY_HASH_SECRET and not _is_loopback(self.api_host):
            raise ValueError(
                "api_key_hash_secret: set LOOPSTREAM_API_KEY_HASH_SECRET before listening on "
                f"{self.api_host} (the development secret is public)"
            )
        return self

    @property
    def base_url(self) -> str:
        if self.api_base_url:
            return self.api_base_url.rstrip("/")
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        return f"http://{host}:{self.api_port}"


def public_defaults_in_use(settings: Settings) -> list[str]:
    """The environment variables still at the local stack's public development value."""
    checks = (
        ("LOOPSTREAM_PG_PASSWORD", settings.pg_password == DEV_PG_PASSWORD),
        ("LOOPSTREAM_S3_ACCESS_KEY", settings.s3_access_key == DEV_S3_ACCESS_KEY),
        ("LOOPSTREAM_S3_SECRET_KEY", settings.s3_secret_key == DEV_S3_SECRET_KEY),
        ("LOOPSTREAM_SECRETS_KEK", settings.secrets_kek == DEV_SECRETS_KEK),
    )
    return [name for name, is_default in checks if is_default]


def refuse_public_defaults(settings: Settings, api_settings: ApiSettings) -> None:
    """Refuse to serve off loopback with the development PostgreSQL/S3 credentials or secrets
    key: they are public, so anyone who reaches the stack could read or rewrite it. (The API's
    own secrets are checked by ApiSettings itself.)"""
    if _is_loopback(api_settings.api_host):
        return
    in_use = public_defaults_in_use(settings)
    if in_use:
        raise ValueError(
            f"set {', '.join(in_use)} before listening on {api_settings.api_host} "
            "(the development credentials are public)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_api_settings() -> ApiSettings:
    return ApiSettings()
