"""The dead-letter table's columns and topic record, said once
(usertrail/deadletters.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from usertrail.migrations.models import DeadLetterTable

from usertrail import deadletters


def test_the_column_list_is_the_tables() -> None:
    assert deadletters.COLUMNS == tuple(c.name for c in DeadLetterTable.__table__.columns)
    assert set(deadletters.WRITTEN) | {"id", "received_at", "retries", "resolved_at"} == set(
        deadletters.COLUMNS
    )


@given(
    key=st.none() | st.binary(max_size=deadletters.MAX_BYTES // 4),
    size=st.integers(0, 2 * deadletters.MAX_BYTES),
    error=st.text(max_size=3000),
)
def test_a_dead_letter_on_the_topic_fits_and_says_what_was_cut(
    key: bytes | None, size: int, error: str
) -> None:
    value = b"v" * size
    m = deadletters.message("invalid", error, "usertrail.events", 3, 17, key, value)
    headers = dict(m.headers)
    assert headers["source"] == b"usertrail.events/3/17"
    assert headers["reason"] == b"invalid"
    assert len(headers["error"]) <= 4 * 1000
    assert m.value == value[: deadletters.MAX_BYTES]
    assert ("truncated-from" in headers) == (size > deadletters.MAX_BYTES)
    if key is not None:
        assert m.key == key[: deadletters.MAX_BYTES // 8]
        assert ("key-truncated-from" in headers) == (len(key) > deadletters.MAX_BYTES // 8)


def test_a_record_with_neither_key_nor_value_still_has_a_dead_letter_record() -> None:
    """A producer sends a key or a value (aiokafka asserts one): a dead
    letter of a record that had neither goes out with an empty value, and
    says so. (Sent as it was, it stopped the sink at every start.)"""
    m = deadletters.message("invalid", "empty record value (null)", "t", 0, 5, None, None)
    assert (m.key, m.value) == (None, b"")
    assert ("value-null", b"true") in m.headers
    kept = deadletters.message("invalid", "e", "t", 0, 6, b"k", None)
    assert kept.value is None and ("value-null", b"true") not in kept.headers
