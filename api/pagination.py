"""Opaque page tokens for checkpoint file listings.

A token is `base64url(json {"c": checkpoint_id, "w": workspace_id, "o": offset}) + "." +
base64url(hmac)`. The HMAC makes it tamper-evident (a client cannot forge an offset or reuse a
token on another checkpoint), and binding it to the checkpoint id and the caller's workspace keeps
tokens meaningless outside the listing that issued them: a token that leaks to another workspace
pages nothing there (tokens without "w", issued before tenancy, belong to the default one).
Offsets are enough because a checkpoint's file list never changes once recorded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from events.envelope import DEFAULT_WORKSPACE


class InvalidPageToken(ValueError):
    pass


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, body: bytes) -> bytes:
    # 16 bytes of SHA-256 are plenty against forgery and keep tokens short.
    return hmac.new(secret.encode(), body, hashlib.sha256).digest()[:16]


def encode_page_token(
    *, checkpoint_id: str, offset: int, secret: str, workspace_id: str = DEFAULT_WORKSPACE
) -> str:
    fields = {"c": checkpoint_id, "w": workspace_id, "o": offset}
    body = json.dumps(fields, separators=(",", ":")).encode()
    return f"{_b64encode(body)}.{_b64encode(_mac(secret, body))}"


def decode_page_token(
    token: str, *, checkpoint_id: str, secret: str, workspace_id: str = DEFAULT_WORKSPACE
) -> int:
    """The offset a token stands for; `InvalidPageToken` if it was altered or is foreign."""
    try:
        body_part, mac_part = token.split(".")
        body, mac = _b64decode(body_part), _b64decode(mac_part)
    except (ValueError, binascii.Error) as exc:
        raise InvalidPageToken("page_token is malformed") from exc
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise InvalidPageToken("page_token is not valid (altered, or issued by another server)")
    try:
        data = json.loads(body)
        owner, offset = data["c"], data["o"]
        workspace = data.get("w", DEFAULT_WORKSPACE)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidPageToken("page_token is malformed") from exc
    # One answer for both: another workspace's token must not tell that workspace's ids apart.
    if owner != checkpoint_id or workspace != workspace_id:
        raise InvalidPageToken("page_token belongs to another checkpoint")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidPageToken("page_token is malformed")
    return offset
