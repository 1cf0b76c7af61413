"""Review holes of issue 11 item 7: schema names checked at one place, public development
credentials refused off loopback, presigned URL TTL capped."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.config import ApiSettings, refuse_public_defaults
from api.queries import ReadModels
from infra.settings import Settings, checked_identifier
from projections.names import retired_name, shadow_name

REAL = {
    "pg_password": "a-real-password",
    "s3_access_key": "real-access",
    "s3_secret_key": "a-real-s3-secret",
    "secrets_kek": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
}
OFF_LOOPBACK = {
    "api_host": "0.0.0.0",
    "page_token_secret": "a-real-page-token-secret-32-chars",
    "api_key_hash_secret": "a-real-api-key-hash-secret-32-chars",
}


@pytest.mark.parametrize(
    "name", ["loops; drop table x", "Loops", "loops.x", "1loops", "", "a" * 64, 'lo"ops']
)
def test_a_schema_name_that_is_not_a_plain_identifier_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a plain lowercase SQL identifier"):
        checked_identifier(name)


def test_read_schema_is_checked_when_settings_load() -> None:
    with pytest.raises(ValidationError, match="read_schema"):
        Settings(read_schema="loops; drop schema loops cascade")


def test_every_name_derived_from_the_longest_read_schema_is_still_valid() -> None:
    longest = Settings(read_schema="s" * 40).read_schema
    for derived in (shadow_name(longest), retired_name(longest), f"{longest}_secrets"):
        assert checked_identifier(derived) == derived
    with pytest.raises(ValidationError, match="read_schema"):
        Settings(read_schema="s" * 41)


def test_read_models_refuse_an_unchecked_schema() -> None:
    with pytest.raises(ValueError, match="not a plain lowercase SQL identifier"):
        ReadModels(conn=None, schema="loops x")  # type: ignore[arg-type]


def test_dev_credentials_are_refused_when_the_api_listens_off_loopback() -> None:
    with pytest.raises(ValueError) as refused:
        refuse_public_defaults(Settings(), ApiSettings(**OFF_LOOPBACK))
    for name in ("PG_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "SECRETS_KEK"):
        assert f"LOOPSTREAM_{name}" in str(refused.value)


@pytest.mark.parametrize("default", sorted(REAL))
def test_each_dev_credential_alone_is_refused_off_loopback(default: str) -> None:
    settings = Settings(**{k: v for k, v in REAL.items() if k != default})
    with pytest.raises(ValueError, match=f"LOOPSTREAM_{default.upper()}"):
        refuse_public_defaults(settings, ApiSettings(**OFF_LOOPBACK))


def test_real_credentials_off_loopback_and_dev_ones_on_loopback_are_fine() -> None:
    refuse_public_defaults(Settings(**REAL), ApiSettings(**OFF_LOOPBACK))
    refuse_public_defaults(Settings(), ApiSettings(api_host="127.0.0.1"))
    refuse_public_defaults(Settings(), ApiSettings(api_host="localhost"))


def test_secrets_key_must_be_32_bytes() -> None:
    with pytest.raises(ValidationError, match="secrets_kek"):
        Settings(secrets_kek="c2hvcnQ=")


def test_credentials_are_not_printed() -> None:
    shown = repr(Settings(**REAL))
    for secret in ("pg_password", "s3_secret_key", "secrets_kek"):  # the access key is an id
        assert REAL[secret] not in shown


def test_presigned_url_ttl_has_a_ceiling_of_seven_days() -> None:
    assert ApiSettings(presigned_url_ttl_s=7 * 24 * 3600).presigned_url_ttl_s == 604800
    with pytest.raises(ValidationError, match="presigned_url_ttl_s"):
        ApiSettings(presigned_url_ttl_s=7 * 24 * 3600 + 1)
