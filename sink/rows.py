"""``"UserInteraction"`` rows, in COPY's binary format (and in its text
format, for the benchmarks' raw COPY).

``binary_row`` makes the row of a validated ``Interaction``. ``fast_row``
makes the same row straight from the wire bytes, in about half the time of
validating them with the contract's models, for the one layout ``encode``
writes (the SDK's, the demo's): every field is checked against the same
rules, as strictly or more, and the metadata is validated and written again
by pydantic as the slow path does. Bytes in any other layout (another
producer's key order, spacing, escapes) give None and go the slow way, where
the contract decides. ``tests/sink/test_rows.py`` holds the two paths to the
same answer, and the binary rows to what COPY's text format stores.

Binary, not text: PostgreSQL takes the time as a number instead of parsing
it, and nothing is escaped on either side (sink/writer.py's COPY).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import struct
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from pydantic import ConfigDict, TypeAdapter
from pydantic_core import to_json
from usertrail.producers.events import (
    EVENT_MAX_BYTES,
    FUTURE_BOUND_MS,
    INTERACTION_TYPES,
    PAST_BOUND_MS,
    SLUG_MAX,
    SLUG_PATTERN,
    SOURCE_MAX,
    USER_ID_MAX,
    ContractModel,
    Interaction,
    JsonObject,
)
from usertrail.producers.profiles import ProfileMessage

NULL = "\\N"  # COPY text format's NULL


def copy_text(value: str) -> str:
    # COPY text format: backslash starts an escape. Ids cannot hold control
    # characters (the contract refuses them) and JSON escapes its own.
    return value.replace("\\", "\\\\") if "\\" in value else value


def utc_wall_time(at: datetime) -> str:
    """``at`` in UTC, without the zone ("2026-01-02T03:04:05.000006"): what
    a timestamp without time zone column holds."""
    if at.utcoffset():
        at = at.astimezone(UTC)
    # pydantic-core writes an instant in UTC as RFC 3339 with "Z", in about
    # half the time of datetime.isoformat
    text = to_json(at).decode()
    if text.endswith('Z"'):
        return text[1:-2]
    return at.replace(tzinfo=None).isoformat()


def copy_line(e: Interaction) -> str:
    """The row of an interaction: createdAt is the event time in UTC (a
    timestamp without time zone, as the seed defines it)."""
    theme, rating = e.theme, e.rating
    return (
        f"{e.event_id}\t{copy_text(e.user_id)}\t{utc_wall_time(e.occurred_at)}"
        f"\t{e.type}\t{e.service}\t{NULL if theme is None else theme}"
        f"\t{NULL if rating is None else rating}"
        f"\t{copy_text(to_json(e.metadata).decode())}\n"
    )


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_field(value: str | None) -> str:
    """Any text as a COPY text field (NULL for None)."""
    return NULL if value is None else value.translate(_COPY_ESCAPES)


def _json_field(value: Any) -> str:
    # JSON escapes every control character; COPY then needs its backslashes doubled
    return copy_text(to_json(value, by_alias=True).decode())


def profile_copy_line(user: str, m: ProfileMessage) -> bytes:
    """The ``user_vectors`` row of a profile, as ``vectors_upsert`` takes it
    (sink/writer.py's VECTOR_COLUMNS), in COPY text format."""
    at = utc_wall_time(m.updated_at)
    last = m.last_segment_update
    confidence = m.segment_confidence
    return (
        "\t".join(
            (
                copy_field(user),
                copy_field(user),
                _json_field(m.vector),
                at,
                at,
                _json_field(m.segments),
                copy_field(m.primary_segment),
                NULL if confidence is None else repr(confidence),
                NULL if last is None else utc_wall_time(last),
            )
        )
        + "\n"
    ).encode()


def interaction_copy_rows(interactions: Iterable[Interaction]) -> bytes:
    """The COPY text of many rows."""
    return "".join(map(copy_line, interactions)).encode()


# --- COPY's binary format ------------------------------------------------------------------
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, extension
BINARY_TRAILER = struct.pack(">h", -1)
_EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC)  # a timestamp's zero
_EPOCH_2000_S = int(_EPOCH_2000.timestamp())
_MICROSECOND = timedelta(microseconds=1)
_COLUMNS = struct.pack(">h", 8)
_ROW_START = _COLUMNS + struct.pack(">i", 36)  # fast_row's event ids: a UUID's text, always
_LENGTH = struct.Struct(">i")
_TIME = struct.Struct(">iq")  # length 8, microseconds since 2000-01-01
_NULL_FIELD = _LENGTH.pack(-1)
_RATINGS = {str(r).encode(): struct.pack(">ii", 4, r) for r in range(1, 6)}
_JSONB_V1 = b"\x01"  # jsonb's binary form: a version byte, then JSON text


@functools.lru_cache(maxsize=1 << 12)
def _text(value: bytes) -> bytes:
    """A text column's binary field: its length, then its UTF-8 bytes.
    (Remembered: types, services and themes are a few words, over and over.)"""
    return _LENGTH.pack(len(value)) + value


def binary_row(e: Interaction) -> bytes:
    """The row of an interaction in COPY's binary format: createdAt is the
    event time in UTC (a timestamp without time zone, as the seed defines
    it), the same row ``copy_line`` writes as text."""
    event_id, user = str(e.event_id).encode(), e.user_id.encode()
    metadata = to_json(e.metadata)
    # in UTC first, as copy_line: a time whose UTC falls outside years
    # 1-9999 raises OverflowError here (the record is then unapplicable),
    # never a row that no client could read back
    at = e.occurred_at.astimezone(UTC)
    return b"".join(
        (
            _COLUMNS,
            _LENGTH.pack(len(event_id)),
            event_id,
            _LENGTH.pack(len(user)),
            user,
            _TIME.pack(8, (at - _EPOCH_2000) // _MICROSECOND),
            _text(e.type.encode()),
            _text(e.service.encode()),
            _NULL_FIELD if e.theme is None else _text(e.theme.encode()),
            _NULL_FIELD if e.rating is None else struct.pack(">ii", 4, e.rating),
            _LENGTH.pack(len(metadata) + 1),
            _JSONB_V1,
            metadata,
        )
    )


class FastRow(NamedTuple):
    """An interaction read by ``fast_row``: what the sink needs of it."""

    event_id: str
    user_id: str
    row: bytes  # its "UserInteraction" row, as binary_row writes it
    kind: str = "interaction"


# ASCII without control characters, '"' or '\' (no JSON escapes), not
# starting with a space: a subset of the contract's user ids and sources.
_TEXT = rb"[!#-\[\]-~][ !#-\[\]-~]"
_SLUG = SLUG_PATTERN.strip("^$").encode()  # its length is checked after the match
_TYPES = "|".join(INTERACTION_TYPES).encode()
_CANONICAL = re.compile(
    rb'\{"eventId":"([0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})",'
    rb'"userId":"(' + _TEXT + b"{0,%d}" % (USER_ID_MAX - 1) + rb')",'  # USER_ID_MAX at most
    rb'"occurredAt":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z",'
    rb'"schemaVersion":1,"source":"'
    + _TEXT
    + b"{0,%d}" % (SOURCE_MAX - 1)
    + rb'","kind":"interaction",'
    rb'"type":"(' + _TYPES + rb')","service":"(' + _SLUG + rb')",'
    rb'(?:"theme":"(' + _SLUG + rb')",)?(?:"rating":([1-5]),)?"metadata":(\{.*\})\}',
    re.DOTALL,
)
_METADATA: TypeAdapter[dict[str, Any]] = TypeAdapter(
    JsonObject,  # with the contract's own checks: finite numbers, no NUL
    config=ConfigDict(
        strict=ContractModel.model_config.get("strict", False),
        allow_inf_nan=ContractModel.model_config.get("allow_inf_nan", True),
    ),
)
_NULL = NULL.encode()
# Flat metadata (the usual kind): distinct short keys, each holding a whole
# number, a string of printable ASCII without '"' or '\\', true, false or
# null. pydantic would read it and write it back byte for byte, so it is
# taken as it is; anything else is read and written again.
_FLAT_ITEM = (
    rb'"[A-Za-z0-9_]{1,64}":'
    rb'(?:0|-?[1-9][0-9]{0,14}|"[ !#-\[\]-~]{0,256}"|true|false|null)'
)
_FLAT_METADATA = re.compile(rb"\{(?:" + _FLAT_ITEM + rb"(?:," + _FLAT_ITEM + rb")*)?\}")
_FLAT_KEY = re.compile(rb'"([A-Za-z0-9_]+)":')


def canonical_metadata(metadata: bytes) -> bytes:
    """The metadata as pydantic writes it after the contract's checks (raises
    ValueError where the contract refuses it)."""
    if _FLAT_METADATA.fullmatch(metadata):
        if b"," not in metadata:  # one key at most: none repeats
            return metadata
        keys = _FLAT_KEY.findall(metadata)
        if len(keys) == len(set(keys)):
            return metadata
    return to_json(_METADATA.validate_json(metadata))


@functools.lru_cache(maxsize=1 << 14)
def _epoch_second(second: bytes) -> int:
    """``second`` ("2026-01-02T03:04:05", UTC) in seconds since the epoch;
    ValueError if it is no real date and time of day. (Remembered: events
    come many to a second, and datetime.fromisoformat with the zone took a
    tenth of the sink's time per row.)"""
    return int(datetime.fromisoformat(second.decode() + "+00:00").timestamp())


def fast_row(value: bytes, key: bytes | None, timestamp_ms: int = -1) -> FastRow | None:
    """The row of an interaction in ``encode``'s layout whose key is its user
    id and whose time lies within bounds of the record's timestamp, or None:
    anything else (invalid or not) is for the contract to judge. Compiled
    (sink/_fastrow.c) where it was built, for what it takes; ``python_fast_row``
    otherwise, and for the rest."""
    if _compiled is not None:
        row = _compiled(value, key, timestamp_ms)
        if row is not None:
            return row
    return python_fast_row(value, key, timestamp_ms)


def python_fast_row(value: bytes, key: bytes | None, timestamp_ms: int = -1) -> FastRow | None:
    """``fast_row`` in Python: the reference the compiled one is held to."""
    if len(value) > EVENT_MAX_BYTES:
        return None
    m = _CANONICAL.fullmatch(value)
    if m is None:
        return None
    event_id, user, second, fraction, type_, service, theme, rating, metadata = m.groups()
    if user != key or len(service) > SLUG_MAX or (theme is not None and len(theme) > SLUG_MAX):
        return None
    try:
        at = _epoch_second(second)
        meta = canonical_metadata(metadata)
    except ValueError:  # pydantic's ValidationError is one
        return None
    micros = at * 1_000_000 + (int(fraction.ljust(6, b"0")) if fraction else 0)
    if timestamp_ms >= 0:
        # out_of_bounds's test, on the same float: datetime.timestamp()
        # divides the whole microseconds by 10**6, as here
        at_ms = micros / 1_000_000 * 1000
        if not timestamp_ms - PAST_BOUND_MS <= at_ms <= timestamp_ms + FUTURE_BOUND_MS:
            return None
    row = b"".join(
        (
            _ROW_START,
            event_id,
            _LENGTH.pack(len(user)),
            user,
            _TIME.pack(8, micros - _EPOCH_2000_S * 1_000_000),
            _text(type_),
            _text(service),
            _NULL_FIELD if theme is None else _text(theme),
            _NULL_FIELD if rating is None else _RATINGS[rating],
            _LENGTH.pack(len(meta) + 1),
            _JSONB_V1,
            meta,
        )
    )
    # tuple.__new__: FastRow(...) goes through a Python-level __new__
    return tuple.__new__(FastRow, (event_id.decode(), user.decode(), row, "interaction"))


PATTERNS = hashlib.sha256(
    _CANONICAL.pattern + b"\n" + _FLAT_METADATA.pattern + b"\n" + SLUG_PATTERN.encode()
).hexdigest()
"""What sink/_fastrow.c implements by hand: a module built for other
patterns (an older build of it, a change here it did not follow) is not used."""


def _compiled_fast_row() -> Callable[[bytes, bytes | None, int], FastRow | None] | None:
    """sink/_fastrow.c's fast_row, given the contract's numbers; None where
    the extension was not built (no C compiler at install: it is optional),
    or was built for other patterns."""
    try:
        from usertrail.sink import _fastrow  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(_fastrow, "PATTERNS", None) != PATTERNS:
        logging.getLogger("usertrail.sink").warning(
            "sink/_fastrow.c was built for other patterns than sink/rows.py's: "
            "rows are made in Python (install again to rebuild it)"
        )
        return None
    _fastrow.configure(
        FastRow,
        USER_ID_MAX,
        SOURCE_MAX,
        SLUG_MAX,
        EVENT_MAX_BYTES,
        PAST_BOUND_MS,
        FUTURE_BOUND_MS,
        tuple(t.encode() for t in INTERACTION_TYPES),
    )
    return _fastrow.fast_row  # type: ignore[no-any-return]


_compiled = _compiled_fast_row()
