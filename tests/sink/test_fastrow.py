"""sink/_fastrow.c: the compiled fast_row against its reference, the Python
one (sink/rows.py's python_fast_row). It may pass an event to the Python one
(None), never decide otherwise: whatever it returns is what the Python one
returns for the same bytes, key and timestamp."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from usertrail.producers.events import (
    FUTURE_BOUND_MS,
    INTERACTION_TYPES,
    PAST_BOUND_MS,
    build,
    encode,
)
from usertrail.sink import rows
from usertrail.sink.rows import FastRow, python_fast_row

from tests.contract import event_ids, slugs
from tests.sink.test_rows import _TRICKS, contract_row
from usertrail.errors import EventValidationError

compiled = rows._compiled


def test_it_is_built_by_the_readme_set_up() -> None:
    """The extension is optional for an install without a C compiler; the
    README's set-up has one, so here it must have been built, for the
    patterns of today."""
    from usertrail.sink import _fastrow  # type: ignore[attr-defined]

    assert _fastrow.PATTERNS == rows.PATTERNS, (
        "sink/rows.py's patterns changed: sink/_fastrow.c implements them by hand; "
        f"update it, then its PATTERNS ({rows.PATTERNS})"
    )
    assert compiled is not None, "sink/_fastrow.c was not built: `./dev setup` with gcc"
    assert INTERACTION_TYPES == ("reading", "chat", "feedback", "share")


def judged_alike(value: bytes, key: bytes | None, timestamp_ms: int = -1) -> FastRow | None:
    assert compiled is not None
    row = compiled(value, key, timestamp_ms)
    if row is not None:
        assert type(row) is FastRow
        assert row == python_fast_row(value, key, timestamp_ms), value
    return row


_flat_values = st.one_of(
    st.integers(-(10**15) + 1, 10**15 - 1),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=257),
    st.booleans(),
    st.none(),
)
flat_metadata = st.dictionaries(st.from_regex(r"\A[A-Za-z0-9_]{1,65}\Z"), _flat_values, max_size=8)


def _built(**fields: object) -> object:
    try:
        return build("interaction", **fields)  # type: ignore[arg-type]
    except EventValidationError:
        return None


# within what the compiled one takes: years whose microseconds fit a double
flat_interactions = st.builds(
    _built,
    event_id=event_ids,
    user_id=st.from_regex(r"\A[!#-\[\]-~][ !#-\[\]-~]{0,190}\Z"),
    occurred_at=st.datetimes(
        min_value=datetime(1685, 1, 1),  # noqa: DTZ001
        max_value=datetime(2255, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    source=st.from_regex(r"\A[!#-\[\]-~][ !#-\[\]-~]{0,99}\Z"),
    type=st.sampled_from(INTERACTION_TYPES),
    service=slugs,
    theme=st.none() | slugs,
    rating=st.none() | st.integers(1, 5),
    metadata=flat_metadata,
).filter(lambda e: e is not None)


@given(flat_interactions, st.integers(-2, 3))
def test_what_the_python_one_takes_flat_it_takes_alike(event: object, around: int) -> None:
    """Every interaction the Python one takes with flat metadata, the compiled
    one takes too, with the same row; with the record's timestamp at the
    bounds (a millisecond either side) they decide alike."""
    value, key = encode(event), event.user_id.encode()  # type: ignore[arg-type, attr-defined]
    at_ms = int(event.occurred_at.timestamp() * 1000)  # type: ignore[attr-defined]
    for timestamp in (-1, at_ms, at_ms + PAST_BOUND_MS + around, at_ms - FUTURE_BOUND_MS + around):
        if timestamp < 0 and timestamp != -1:
            continue
        want = python_fast_row(value, key, timestamp)
        got = judged_alike(value, key, timestamp)
        if (
            want is not None
            and b"\\" not in value
            and rows._FLAT_METADATA.fullmatch(
                json.dumps(event.metadata, separators=(",", ":")).encode()  # type: ignore[attr-defined]
            )
        ):
            assert got == want, value
    assert compiled is not None and compiled(value, key + b"x", -1) is None


_FLAT_BASE = encode(
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
        metadata={"a": 1, "b": "x y", "c": True, "d": None},
    )
)
_FLAT_TRICKS = [
    *((old, new) for old, new in _TRICKS if old in _FLAT_BASE),
    (b'"userId":"u1"', b'"userId":"' + b"u" * 191 + b'"'),
    (b'"userId":"u1"', b'"userId":"' + b"u" * 192 + b'"'),
    (b'"userId":"u1"', b'"userId":"u 1 "'),
    (b'"source":"web"', b'"source":"' + b"w" * 100 + b'"'),
    (b'"source":"web"', b'"source":"' + b"w" * 101 + b'"'),
    (b'"source":"web"', b'"source":" web"'),
    (b'"service":"tarot"', b'"service":"' + b"a" * 64 + b'"'),
    (b'"service":"tarot"', b'"service":"' + b"a" * 65 + b'"'),
    (b"2026-03-01", b"1684-01-01"),
    (b"2026-03-01", b"1685-01-01"),
    (b"2026-03-01", b"2255-06-01"),
    (b"2026-03-01", b"2256-01-01"),
    (b'"a":1', b'"a":01'),
    (b'"a":1', b'"a":-0'),
    (b'"a":1', b'"a":1234567890123456'),
    (b'"a":1', b'"a":-123456789012345'),
    (b'"a":1', b'"a":1.0'),
    (b'"a":1', b'"a":1,"a":2'),
    (b'"a":1', b'"' + b"k" * 65 + b'":1'),
    (b'"a":1', b'"":1'),
    (b'"b":"x y"', b'"b":"' + b"x" * 257 + b'"'),
    (b'"b":"x y"', b'"b":"x\\"y"'),
    (b'"b":"x y"', b'"b":"x\ty"'),
    (b'"c":true', b'"c":True'),
    (b'"d":null', b'"d":nul'),
    (b'"d":null}}', b'"d":null,}}'),
    (b'{"a":1,"b":"x y","c":true,"d":null}', b"{}"),
    (
        b'{"a":1,"b":"x y","c":true,"d":null}',
        b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(70)) + b"}",
    ),
    (b"2026-03-01", b"2024-02-29"),
    (b"2026-03-01", b"2023-02-29"),
    (b"2026-03-01", b"1900-02-29"),
    (b"2026-03-01", b"2000-02-29"),
    (b"2026-03-01", b"9999-12-31"),
    (b"2026-03-01", b"0001-01-01"),
    (b"2026-03-01", b"1969-12-31"),
    (b'"type":"reading"', b'"type":"readings"'),
    (b'"type":"reading"', b'"type":"read"'),
    (b'"service":"tarot"', b'"service":"ta--rot"'),
    (b'"service":"tarot"', b'"service":"tarot-"'),
    (b'"service":"tarot"', b'"service":"_tarot"'),
    (b'"service":"tarot"', b'"service":"t_a-r"'),
    (b',"theme":"love"', b""),
    (b',"rating":5', b""),
]


@pytest.mark.parametrize(("old", "new"), _FLAT_TRICKS)
def test_each_broken_rule_is_judged_alike(old: bytes, new: bytes) -> None:
    assert old in _FLAT_BASE
    value = _FLAT_BASE.replace(old, new, 1)
    at = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)
    user = value.split(b'"userId":"', 1)[1].split(b'"', 1)[0]
    for key in (b"u1", None, b"", user):
        for timestamp in (-1, -2, 0, int(at.timestamp() * 1000), 2**52, 2**63, 2**70):
            judged_alike(value, key, timestamp)
    row = judged_alike(value, user)
    if row is not None:  # and what it takes, the contract writes alike
        assert row.row == contract_row(value, user)
        assert hash(row) == hash(python_fast_row(value, user))


@given(
    st.sampled_from(_FLAT_TRICKS),
    st.integers(0, len(_FLAT_BASE)),
    st.binary(max_size=3) | st.sampled_from([b"}", b",", b'"', b"0", b"-", b"_", b"}}"]),
    st.integers(0, 3),
    st.sampled_from([-1, int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)]),
)
@example(_FLAT_TRICKS[-1], 0, b"", 0, -1)
def test_any_damage_to_the_bytes_is_judged_alike(
    trick: tuple[bytes, bytes], at: int, insert: bytes, delete: int, timestamp: int
) -> None:
    value = _FLAT_BASE.replace(*trick, 1)
    at = min(at, len(value))
    value = value[:at] + insert + value[at + delete :]
    assume(value != _FLAT_BASE or not insert)
    judged_alike(value, b"u1", timestamp)


def test_other_arguments_go_the_python_way() -> None:
    assert compiled is not None
    assert compiled(bytearray(_FLAT_BASE), b"u1", -1) is None
    assert compiled(_FLAT_BASE, bytearray(b"u1"), -1) is None
    assert compiled(_FLAT_BASE, b"u1", 1.0) is None
    assert compiled(_FLAT_BASE, b"u1", True) is None
    assert compiled(_FLAT_BASE, b"u1") == python_fast_row(_FLAT_BASE, b"u1") is not None
    with pytest.raises(TypeError):
        compiled(_FLAT_BASE)
    assert rows.fast_row(_FLAT_BASE, b"u1") == python_fast_row(_FLAT_BASE, b"u1")
    late = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC) + timedelta(days=3700)
    assert compiled(_FLAT_BASE, b"u1", int(late.timestamp() * 1000)) is None
