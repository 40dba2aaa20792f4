"""The archive's encoding (usertrail/archive.py): what the sink stores of a
batch's records gives back exactly those records, and rows stored before
the sink compressed them still read."""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usertrail.archive import _row_records, decode, encode
from usertrail.errors import LogResetError
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


def uncompressed(records: list[SimpleNamespace]) -> bytes:
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
    assert [tuple(r) for r in decode(uncompressed(records))] == _as_read(records)


_RECORDS = [
    SimpleNamespace(
        offset=40 + i, timestamp=1767225600000 + i, key=b"u%d" % i, value=b"{}" * i, headers=[]
    )
    for i in range(20)
]


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
    assert len(data) * 4 < len(uncompressed(records))
    assert [tuple(r) for r in decode(data)] == _as_read(records)


def _row(records: list[SimpleNamespace], data: bytes) -> tuple[str, int, int, int, int, bytes]:
    return ("usertrail.events", 3, records[0].offset, records[-1].offset, len(records), data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut short
        lambda data: (
            data[:1] + struct.pack(">I", struct.unpack(">I", data[1:5])[0] + 64) + data[5:]
        ),
        lambda data: data[:1] + struct.pack(">I", struct.unpack(">I", data[1:5])[0] - 9) + data[5:],
        lambda data: data[:5] + bytes(len(data) - 5),  # the block zeroed
        lambda data: data[:3],
        lambda data: uncompressed(_RECORDS)[:-7],  # an old row cut short
    ],
)
def test_a_damaged_archive_row_is_refused_naming_the_row(damage: Callable[[bytes], bytes]) -> None:
    """`log restore` meets a row that is not what the sink wrote: it stops
    with LogResetError (exit code 3) naming the partition and offsets,
    before producing anything of that row, never a traceback or made-up
    records."""
    assert [tuple(r) for r in _row_records(*_row(_RECORDS, encode(_RECORDS)))] == _as_read(_RECORDS)
    with pytest.raises(LogResetError, match=r"usertrail\.events\[3\], archived offsets 40-59"):
        _row_records(*_row(_RECORDS, damage(encode(_RECORDS))))
