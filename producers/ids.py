"""Time-ordered event ids (UUIDv7, RFC 9562).

Ids made by one process are strictly increasing: within one millisecond the
12-bit ``rand_a`` field is a counter (RFC 9562 method 1), and a clock that
steps back never makes an id smaller than the last one.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

_lock = threading.Lock()


def _new_lock_in_child() -> None:  # a thread of the parent may have held it at the fork
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_new_lock_in_child)

_last_ms = 0
_counter = 0
_prefix = ""  # the text of _last_ms: "tttttttt-tttt-7"


def uuid7() -> str:
    """A new lower-case canonical UUIDv7 string."""
    global _last_ms, _counter, _prefix
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = random.getrandbits(10)  # random start, room left to count
            _prefix = _time_text(ms)
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
                _prefix = _time_text(_last_ms)
        prefix, counter = _prefix, _counter
    # Uniqueness, not secrecy: the random module (reseeded after fork) is enough.
    return _text(prefix, counter, random.getrandbits(62))


def _text(prefix: str, rand_a: int, rand_b: int) -> str:
    """``uuid7_from``'s text, with the millisecond's part (``_time_text``)
    made once per millisecond: format specs cost more than the rest of an
    id together."""
    tail = (1 << 63 | rand_b).to_bytes(8, "big").hex()
    return prefix + _HEX3[rand_a] + "-" + tail[:4] + "-" + tail[4:]


_HEX3 = [f"{i:03x}" for i in range(0x1000)]


def _time_text(ms: int) -> str:
    ms &= 0xFFFF_FFFF_FFFF
    return f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"


def uuid7_from(ms: int, rand_a: int, rand_b: int) -> str:
    """The UUIDv7 string of a Unix millisecond time, 12 bits ``rand_a`` and
    62 bits ``rand_b`` (RFC 9562 layout)."""
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: str) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return uuid.UUID(value).int >> 80
