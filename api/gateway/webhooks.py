"""Webhooks of async predict requests: the URL rule, the body, its signature, the retry schedule.

Pure except `check_webhook_url`, which resolves the host name (DNS) unless told the addresses.

- Signature (Baseten's): `X-BASETEN-SIGNATURE: v1=<hex>`, HMAC-SHA256 of the raw body under the
  workspace's secret `webhook-signing-key`. A receiver recomputes it over the bytes it got and
  compares in constant time (`verify_signature`).
- SSRF rule: http or https, a host, and every address the host resolves to public (global
  unicast) -- unless the gateway itself listens on loopback (the local stack), where private and
  loopback receivers are allowed too. Checked at submit and again before every attempt (a name
  may resolve elsewhere by then).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-BASETEN-SIGNATURE"
EVENT_TYPE = "async_request_completed"


class WebhookRefused(ValueError):
    """The URL may not be called (the message says why)."""


def sign(key: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "v1=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(key: str, body: bytes, header: str) -> bool:
    """True when one of the header's `v1=` signatures is `body`'s under `key` (a header may carry
    several, comma-separated, while a key is being rotated)."""
    wanted = sign(key, body)
    return any(hmac.compare_digest(wanted, part.strip()) for part in header.split(","))


def backoff_schedule(attempts: int, *, base_s: float, cap_s: float = 300.0) -> list[float]:
    """The waits between `attempts` attempts: base, 2*base, 4*base, ... (at most cap_s each);
    one fewer than the attempts, since nothing waits after the last."""
    return [min(base_s * 2**i, cap_s) for i in range(max(attempts - 1, 0))]


def webhook_body(
    *,
    request_id: str,
    model_id: str,
    deployment_id: str,
    at: datetime,
    data: dict[str, Any] | None,
    errors: Sequence[dict[str, str]],
) -> bytes:
    """The JSON a receiver gets; `request_id` lets it drop a repeat (delivery is at-least-once)."""
    return json.dumps(
        {
            "request_id": request_id,
            "model_id": model_id,
            "deployment_id": deployment_id,
            "type": EVENT_TYPE,
            "time": at.isoformat(),
            "data": data,
            "errors": list(errors),
        },
        separators=(",", ":"),
    ).encode()


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _public(address: str) -> bool:
    ip = _ip(address)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook_endpoint: host {host!r} does not resolve ({exc})") from None
    return sorted({str(info[4][0]) for info in infos})


def check_webhook_url(
    url: str, *, allow_private: bool, addresses: Sequence[str] | None = None
) -> None:
    """Raise WebhookRefused unless `url` may be called (the module's SSRF rule). `addresses`:
    what the host resolves to, when the caller knows (tests); else DNS is asked."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"webhook_endpoint: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("webhook_endpoint: must be an http or https URL")
    if not parts.hostname:
        raise WebhookRefused("webhook_endpoint: must name a host")
    found = list(addresses) if addresses is not None else _resolve(parts.hostname, port)
    # Link-local addresses hold cloud metadata services (169.254.169.254): never a webhook,
    # not even from a local stack's gateway.
    link_local = [a for a in found if _ip(a).is_link_local]
    if link_local:
        raise WebhookRefused(
            f"webhook_endpoint: host {parts.hostname!r} resolves to a link-local address "
            f"({', '.join(link_local)}); webhooks never go there"
        )
    if allow_private:
        return
    private = [a for a in found if not _public(a)]
    if private or not found:
        raise WebhookRefused(
            f"webhook_endpoint: host {parts.hostname!r} resolves to a private, loopback or "
            f"reserved address ({', '.join(private) or 'none'}); webhooks go to public hosts only"
        )


def gateway_on_loopback(host: str) -> bool:
    """Whether a gateway listening on `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
