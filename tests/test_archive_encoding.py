"""The archive's encoding (usertrail/archive.py): what the sink stores of a
batch's records gives back exactly those records, and rows stored before
the sink compressed them still read."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from usertrail.archive import decode, encode
from usertrail.kafka import encode_headers

_headers = st.one_of(
    st.just([]), st.lists(st.tuples(st.text(max_size=12), st.none() | st.binary(max_size=20)))
)
_records = st.lists(
    st.builds(
        SimpleNamespace,
        offset=st.integers(0, 2**62),
        timestamp=st.integers(-1, 2**50),
        key=st.none() | st.binary(max_size=40),
        value=st.none() | st.binary(max_size=600),
        headers=_headers,
    ),
    max_size=30,
)


def _as_read(records: list[SimpleNamespace]) -> list[tuple[object, ...]]:
    return [(r.offset, r.key, r.value, r.timestamp, r.headers) for r in records]


def _uncompressed(records: list[SimpleNamespace]) -> bytes:
    """A row's data as the sink wrote it before it compressed it: per
    record offset, timestamp (int64), the lengths of key, value and headers
    (int32, -1 null), then their bytes."""
    out = b""
    for r in records:
        headers = encode_headers(r.headers)
        fields = (r.key, r.value, headers)
        out += struct.pack(
            ">qqiii", r.offset, r.timestamp, *(-1 if f is None else len(f) for f in fields)
        )
        out += b"".join(f or b"" for f in fields)
    return out


@given(_records)
def test_what_is_archived_decodes_to_the_same_records(records: list[SimpleNamespace]) -> None:
    assert [tuple(r) for r in decode(encode(records))] == _as_read(records)


@given(_records)
def test_rows_archived_uncompressed_still_decode(records: list[SimpleNamespace]) -> None:
    assert [tuple(r) for r in decode(_uncompressed(records))] == _as_read(records)


def test_the_archive_compresses_a_batch_of_events() -> None:
    value = (
        b'{"eventId":"0190f0a1-2b3c-7d4e-8f50-61728394a5b6","userId":"user-17",'
        b'"occurredAt":"2026-01-01T00:00:00.001Z","schemaVersion":1,"source":"app",'
        b'"kind":"interaction","type":"reading","service":"saju","metadata":{}}'
    )
    records = [
        SimpleNamespace(
            offset=i, timestamp=1767225600000 + i, key=b"user-17", value=value, headers=[]
        )
        for i in range(600)
    ]
    data = encode(records)
    assert len(data) * 4 < len(_uncompressed(records))
    assert [tuple(r) for r in decode(data)] == _as_read(records)
