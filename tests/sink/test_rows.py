"""``fast_row`` (the row straight from the wire bytes) against the contract
(``decode``) followed by ``binary_row``: whatever the fast path takes, the
contract takes too, with the very same row; what it leaves, the slow path
judges."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json
from usertrail.producers.events import EventBase, Interaction, build, decode, encode
from usertrail.sink.plan import DeadLetter, Decoded, Record, classify
from usertrail.sink.rows import (
    _FLAT_METADATA,
    _METADATA,
    BINARY_HEADER,
    BINARY_TRAILER,
    FastRow,
    binary_row,
    canonical_metadata,
    copy_line,
    fast_row,
)

from tests.contract import event_ids, interactions, metadata, slugs
from usertrail.errors import EventValidationError


def contract_row(value: bytes, key: bytes | None) -> bytes | None:
    """The row the slow path writes for these bytes, or None if it writes none."""
    try:
        event = decode(value)
    except EventValidationError:
        return None
    if not isinstance(event, Interaction) or key != event.user_id.encode():
        return None
    return binary_row(event)


def agrees(value: bytes, key: bytes | None) -> FastRow | None:
    row = fast_row(value, key)
    if row is not None:
        assert contract_row(value, key) == row.row, value
        event = decode(value)
        assert (row.event_id, row.user_id) == (event.event_id, event.user_id)
    return row


@given(interactions)
def test_any_interaction_gets_the_contracts_row_or_goes_the_slow_way(event: EventBase) -> None:
    agrees(encode(event), event.user_id.encode())


sdk_interactions = st.builds(
    lambda **f: build("interaction", **f),
    event_id=event_ids,
    user_id=st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9 ._@:-]{0,60}\Z"),
    occurred_at=st.datetimes(
        min_value=datetime(1, 1, 1),  # noqa: DTZ001
        max_value=datetime(9999, 12, 31),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    source=st.sampled_from(["web", "ios", "backend", "demo"]),
    type=st.sampled_from(["reading", "chat", "feedback", "share"]),
    service=slugs,
    theme=st.none() | slugs,
    rating=st.none() | st.integers(1, 5),
    metadata=metadata,
)


@given(sdk_interactions)
def test_what_the_sdk_writes_takes_the_fast_path(event: EventBase) -> None:
    row = agrees(encode(event), event.user_id.encode())
    assert row is not None, encode(event)
    assert agrees(encode(event), b"someone-else") is None  # the key must be the user id


_BASE = encode(
    build(
        "interaction",
        event_id="01936b2a-0000-7000-8000-000000000001",
        user_id="u1",
        occurred_at=datetime(2026, 3, 1, 12, 30, 5, 120000, tzinfo=UTC),
        source="web",
        type="reading",
        service="tarot",
        theme="love",
        rating=5,
        metadata={"a": [1, 2.5, "x\\y\tz"], "b": {"c": None}},
    )
)
# replacements that break one rule each (or none): both paths must agree
_REPLACEMENTS: dict[bytes, list[bytes]] = {
    b'"rating":5': [
        b'"rating":0',
        b'"rating":6',
        b'"rating":4.5',
        b'"rating":"5"',
        b'"rating":null',
    ],
    b'"theme":"love"': [b'"theme":null', b'"theme":"Love"', b'"theme":"' + b"a" * 65 + b'"'],
    b'"service":"tarot"': [b'"service":"' + b"a" * 64 + b'"'],
    b"2026-03-01T12:30:05.120000Z": [
        b"2026-02-30T12:30:05Z",
        b"2026-03-01T24:00:00Z",
        b"2026-03-01T23:59:60Z",
        b"0000-03-01T12:30:05Z",
        b"2026-03-01T12:30:05",
        b"2026-03-01T12:30:05.000Z",
        b"2026-03-01T12:30:05.1234567Z",
        b"2026-03-01T12:30:05+09:00",
        b"2026-03-01T12:30:05.12Z",
        b"2026-03-01T12:30:05.000001Z",
    ],
    b'"b":{"c":null}': [
        b'"b":NaN',
        b'"b":Infinity',
        b'"b":1e400',
        b'"b":1.10',
        b'"b":"\\u00e9\\u0000"',
        b'"b":{"c":1},"b":2',
        b'"b":"\xff"',
    ],
    b'"b":{"c":null}}': [b'"b":{"c":null}},"extra":1', b'"b":{"c":null}}}'],
    b'"userId":"u1"': [
        b'"userId":" "',
        b'"userId":""',
        b'"userId":"' + b"u" * 192 + b'"',
        b'"userId":"u\\u0031"',
    ],
    b'"source":"web"': [b'"source":""'],
    b'"kind":"interaction",': [b""],
    b'"schemaVersion":1': [b'"schemaVersion":2'],
    b"-7000-": [b"-4000-"],
    b'"metadata":{': [b'"metadata": {'],
    b"": [b""],
}
_TRICKS = [(old, new) for old, news in _REPLACEMENTS.items() for new in news]


@pytest.mark.parametrize(("old", "new"), _TRICKS)
def test_both_paths_agree_on_each_broken_rule(old: bytes, new: bytes) -> None:
    assert old in _BASE
    value = _BASE.replace(old, new, 1)
    agrees(value, b"u1" if b'"userId":"u1"' in value else None)
    for key in (b"u1", b" ", b"", b"u" * 192, b"u1\\u0031"):
        agrees(value, key)


@given(
    st.sampled_from(_TRICKS),
    st.integers(0, len(_BASE)),
    st.binary(max_size=3),
    st.integers(0, 3),
)
@example(_TRICKS[-1], 0, b"", 0)
def test_any_damage_to_the_bytes_is_judged_alike(
    trick: tuple[bytes, bytes], at: int, insert: bytes, delete: int
) -> None:
    value = _BASE.replace(*trick, 1)
    at = min(at, len(value))
    value = value[:at] + insert + value[at + delete :]
    assume(value != _BASE or not insert)
    agrees(value, b"u1")


def test_classify_gives_the_fast_row_where_it_can() -> None:
    record = Record("usertrail.events", 0, 7, b"u1", _BASE)
    decoded = classify(record)
    assert isinstance(decoded, Decoded) and isinstance(decoded.event, FastRow)
    assert decoded.event.row == contract_row(_BASE, b"u1")
    spaced = Record("usertrail.events", 0, 8, b"u1", _BASE.replace(b",", b", "))
    slow = classify(spaced)
    assert isinstance(slow, Decoded) and isinstance(slow.event, Interaction)


_flat_values = st.one_of(
    st.integers(-(10**15) + 1, 10**15 - 1),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=256),
    st.booleans(),
    st.none(),
)
_any_values = st.one_of(
    _flat_values,
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)


@given(st.dictionaries(st.from_regex(r"\A[A-Za-z0-9_]{1,64}\Z"), _flat_values, max_size=8))
def test_flat_metadata_is_taken_as_written(meta: dict[str, object]) -> None:
    raw = json.dumps(meta, separators=(",", ":")).encode()
    if b"\\" not in raw:  # no escapes: the fast way, as it came
        assert _FLAT_METADATA.fullmatch(raw)
    assert canonical_metadata(raw) == to_json(_METADATA.validate_json(raw))


@given(
    st.lists(st.tuples(st.text(max_size=3) | st.sampled_from(["a", "b"]), _any_values), max_size=5),
    st.sampled_from([",", ", "]),
)
def test_any_metadata_is_judged_as_pydantic_judges_it(
    items: list[tuple[str, object]], comma: str
) -> None:
    """Repeated keys, escapes, floats, spacing: the same bytes or the same refusal."""
    raw = ("{" + comma.join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}").encode()
    try:
        want = to_json(_METADATA.validate_json(raw))
    except ValueError:
        with pytest.raises(ValueError):
            canonical_metadata(raw)
        return
    assert canonical_metadata(raw) == want


_COLUMNS = '(id, "userId", "createdAt", type, service, theme, rating, metadata)'


def _stored(database_url: str, events: list[Interaction]) -> tuple[list[Any], list[Any]]:
    """What PostgreSQL holds of ``events`` COPYed as text (``copy_line``)
    and as the sink's binary rows."""
    with psycopg.connect(database_url) as conn:
        for table in ("as_text", "as_binary"):
            conn.execute(f'CREATE TEMP TABLE {table} (LIKE "UserInteraction") ON COMMIT DROP')
        with conn.cursor().copy(f"COPY as_text {_COLUMNS} FROM STDIN") as copy:
            copy.write("".join(map(copy_line, events)).encode())
        with conn.cursor().copy(f"COPY as_binary {_COLUMNS} FROM STDIN (FORMAT binary)") as copy:
            copy.write(b"".join((BINARY_HEADER, *map(binary_row, events), BINARY_TRAILER)))
        text, binary = (
            conn.execute(f"SELECT * FROM {table} ORDER BY id, metadata::text").fetchall()
            for table in ("as_text", "as_binary")
        )
    return text, binary


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(interactions, max_size=12))
def test_binary_rows_store_what_copy_text_stores(database_url: str, batch: list[EventBase]) -> None:
    """The sink's binary rows, COPYed into PostgreSQL, hold what the text
    format's rows (``copy_line``) hold: the same ids, times, fields and
    metadata, whatever the events."""
    events = [e for e in batch if isinstance(e, Interaction)]
    text, binary = _stored(database_url, events)
    assert binary == text
    assert len(binary) == len(events)


_TIMES = [
    ("1999-12-31T23:59:59.999999Z", "1999-12-31T23:59:59.999999"),  # before 2000
    ("1969-12-31T23:59:59.5Z", "1969-12-31T23:59:59.500000"),  # before 1970
    ("2026-03-04T05:06:07.123+09:00", "2026-03-03T20:06:07.123000"),
    ("0001-01-01T09:00:00+09:00", "0001-01-01T00:00:00.000000"),
    ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999"),
    ("2000-01-01T00:00:00.000001-00:30", "2000-01-01T00:30:00.000001"),
]


@pytest.mark.parametrize(("written", "utc"), _TIMES)
def test_binary_rows_hold_the_instant_in_utc(
    database_url: str, written: str, utc: datetime
) -> None:
    """An event from another producer, its time at the edges of the
    binary format (its zero, 2000-01-01; 1970; years 1 and 9999) or with an
    offset: the row holds the instant in UTC, as in COPY's text format."""
    value = _BASE.replace(b"2026-03-01T12:30:05.120000Z", written.encode())
    event = decode(value)
    assert isinstance(event, Interaction)
    text, binary = _stored(database_url, [event])
    assert binary == text
    assert binary[0][2].isoformat(timespec="microseconds") == utc  # "createdAt", no zone


@pytest.mark.parametrize("written", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"])
def test_a_time_with_no_utc_date_is_a_dead_letter_not_a_crash(written: str) -> None:
    """0001-01-01T00:00:00+01:00 names an instant of year 0 in UTC, which
    neither Python nor a row can hold: the record, even without a
    timestamp to bound it by, is a dead letter (it used to stop the sink
    as it built the row)."""
    value = _BASE.replace(b"2026-03-01T12:30:05.120000Z", written.encode())
    assert value != _BASE
    dead = classify(Record("usertrail.events", 0, 9, b"u1", value, -1))
    assert isinstance(dead, DeadLetter) and "years 1 to 9999" in dead.error, dead
