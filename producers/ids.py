"""Time-ordered event ids (UUIDv7, RFC 9562).

Ids made by one process are strictly increasing: within one millisecond the
12-bit ``rand_a`` field is a counter (RFC 9562 method 1), and a clock that
steps back never makes an id smaller than the last one.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> str:
    """A new lower-case canonical UUIDv7 string."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = random.getrandbits(10)  # random start, room left to count
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
    # Uniqueness, not secrecy: the random module (reseeded after fork) is enough.
    return uuid7_from(ms, counter, random.getrandbits(62))


def uuid7_from(ms: int, rand_a: int, rand_b: int) -> str:
    """The UUIDv7 string of a Unix millisecond time, 12 bits ``rand_a`` and
    62 bits ``rand_b`` (RFC 9562 layout)."""
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: str) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return uuid.UUID(value).int >> 80
