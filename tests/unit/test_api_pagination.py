"""Checkpoint-file page tokens: opaque, bound to one checkpoint, tamper-evident."""

from __future__ import annotations

import base64
import json

import pytest

from api.pagination import InvalidPageToken, decode_page_token, encode_page_token

SECRET = "test-secret-of-sixteen+"


def test_round_trips_an_offset() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=300, secret=SECRET)
    assert decode_page_token(token, checkpoint_id="ck1", secret=SECRET) == 300


def test_token_is_url_safe_and_opaque() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=7, secret=SECRET)
    assert all(c.isalnum() or c in "-_." for c in token)
    assert "=" not in token


def test_rejects_a_forged_offset() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=1, secret=SECRET)
    _, mac = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"c": "ck1", "o": 2}).encode()).rstrip(b"=")
    with pytest.raises(InvalidPageToken, match="not valid"):
        decode_page_token(f"{forged.decode()}.{mac}", checkpoint_id="ck1", secret=SECRET)


def test_rejects_a_flipped_character() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=1, secret=SECRET)
    flipped = ("A" if token[0] != "A" else "B") + token[1:]
    with pytest.raises(InvalidPageToken):
        decode_page_token(flipped, checkpoint_id="ck1", secret=SECRET)


def test_rejects_a_token_of_another_checkpoint() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=1, secret=SECRET)
    with pytest.raises(InvalidPageToken, match="another checkpoint"):
        decode_page_token(token, checkpoint_id="ck2", secret=SECRET)


def test_rejects_a_token_signed_with_another_secret() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=1, secret="another-secret-0123456")
    with pytest.raises(InvalidPageToken):
        decode_page_token(token, checkpoint_id="ck1", secret=SECRET)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "!!!.???", "e30.AAAA"])
def test_rejects_garbage(garbage: str) -> None:
    with pytest.raises(InvalidPageToken):
        decode_page_token(garbage, checkpoint_id="ck1", secret=SECRET)


def test_a_token_of_another_workspace_is_refused_even_for_the_same_checkpoint_id() -> None:
    token = encode_page_token(checkpoint_id="ck1", offset=1, secret=SECRET, workspace_id="team-a")
    assert decode_page_token(token, checkpoint_id="ck1", secret=SECRET, workspace_id="team-a") == 1
    with pytest.raises(InvalidPageToken, match="another checkpoint"):
        decode_page_token(token, checkpoint_id="ck1", secret=SECRET, workspace_id="team-b")
