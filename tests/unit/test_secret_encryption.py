"""Secret values at rest: AES-GCM round trip, and every way a wrong read must fail."""

from __future__ import annotations

import hashlib

import pytest

from infra.secret_store import SecretUnreadable, decrypt, encrypt, value_digest

KEK = bytes(range(32))
OTHER_KEK = bytes(range(1, 33))
WHERE = {"workspace_id": "default", "name": "hf_access_token"}
VALUE = "hf_abcdefghijklmnopqrstuvwxyz"


def test_a_value_round_trips_and_is_not_in_its_ciphertext() -> None:
    sealed = encrypt(KEK, **WHERE, version=1, value=VALUE)
    assert VALUE.encode() not in sealed
    assert decrypt(KEK, **WHERE, version=1, sealed=sealed) == VALUE


def test_the_same_value_encrypts_differently_each_time() -> None:
    assert encrypt(KEK, **WHERE, version=1, value=VALUE) != encrypt(
        KEK, **WHERE, version=1, value=VALUE
    )


def test_a_wrong_kek_fails() -> None:
    sealed = encrypt(KEK, **WHERE, version=1, value=VALUE)
    with pytest.raises(SecretUnreadable, match="wrong secrets_kek"):
        decrypt(OTHER_KEK, **WHERE, version=1, sealed=sealed)


def test_a_tampered_ciphertext_fails() -> None:
    sealed = bytearray(encrypt(KEK, **WHERE, version=1, value=VALUE))
    sealed[-20] ^= 0x01
    with pytest.raises(SecretUnreadable):
        decrypt(KEK, **WHERE, version=1, sealed=bytes(sealed))


@pytest.mark.parametrize(
    "moved",
    [
        {"workspace_id": "other", "name": "hf_access_token", "version": 1},
        {"workspace_id": "default", "name": "aws_credentials", "version": 1},
        {"workspace_id": "default", "name": "hf_access_token", "version": 2},
    ],
)
def test_a_ciphertext_moved_to_another_workspace_name_or_version_fails(moved: dict) -> None:
    sealed = encrypt(KEK, **WHERE, version=1, value=VALUE)
    with pytest.raises(SecretUnreadable):
        decrypt(KEK, **moved, sealed=sealed)


def test_the_digest_is_keyed_not_a_plain_hash() -> None:
    digest = value_digest(KEK, **WHERE, value="1234")
    assert digest == value_digest(KEK, **WHERE, value="1234")
    assert digest != value_digest(OTHER_KEK, **WHERE, value="1234")
    assert digest != hashlib.sha256(b"1234").hexdigest()
    assert len(digest) == 64
