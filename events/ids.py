"""Identifiers: UUIDv7 (time-ordered) for events and commands, short ids for resources."""

from __future__ import annotations

import os
import secrets
import time
import uuid

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def uuid7(*, unix_ms: int | None = None) -> uuid.UUID:
    """RFC 9562 UUIDv7: 48-bit Unix milliseconds, version, 74 random bits.

    Sorting by id sorts by creation time (to the millisecond), which keeps event ids index-friendly.
    """
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)


def new_event_id() -> str:
    return str(uuid7())


def short_id(length: int = 8) -> str:
    """A resource id in the style of the platform's (`k4q95w5`): lowercase base36."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))
