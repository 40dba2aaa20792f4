"""``accept`` (the stream's check) and ``classify`` (the sink's) agree on
every record: what the sink writes is exactly what the stream folds."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from usertrail.producers.events import Interaction, accept, build, encode
from usertrail.sink.plan import DeadLetter, Decoded, Record, classify
from usertrail.sink.rows import FastRow, binary_row

_EVENT = build(
    "interaction",
    event_id="01936b2a-0000-7000-8000-000000000001",
    user_id="u1",
    occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
    source="web",
    type="reading",
    service="tarot",
    rating=5,
)
_VALID = encode(_EVENT)
values = st.sampled_from(
    [
        _VALID,
        None,
        b"",
        b"not json",
        b"[1, 2]",
        _VALID.replace(b'"rating":5', b'"rating":9'),
        _VALID.replace(b'"kind":"interaction"', b'"kind":"nope"'),
        _VALID.replace(b"}", b',"extra":1}'),
        _VALID.replace(
            b'"service":"tarot"', b'"service":"tarot","metadata":{"x":"' + b"y" * 40_000 + b'"}'
        ),
    ]
)
keys = st.sampled_from([b"u1", b"u2", b"", None])


@given(keys, values)
def test_accept_takes_exactly_what_classify_decodes(key: bytes | None, value: bytes | None) -> None:
    classified = classify(Record("t", 0, 0, key, value))
    accepted = accept(key, value)
    if isinstance(classified, DeadLetter):
        assert accepted is None, classified.reason
    else:
        assert isinstance(classified, Decoded)
        if isinstance(classified.event, FastRow):  # the row made from the bytes directly
            assert isinstance(accepted, Interaction)
            assert classified.event.row == binary_row(accepted)
        else:
            assert accepted == classified.event


def test_a_valid_record_with_its_user_id_as_key_is_accepted() -> None:
    assert accept(b"u1", _VALID) == _EVENT
    assert accept(b"u2", _VALID) is None
