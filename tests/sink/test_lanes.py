"""The sink's lanes (sink/consumer.py): each writer takes the batches of a
fixed share of the partitions, so a partition's records stay in one lane, in
the order they were fetched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from usertrail.sink.consumer import Sink, SinkOptions
from usertrail.sink.plan import Record

from usertrail.errors import ConfigurationError
from usertrail.settings import Settings

batches = st.lists(st.tuples(st.sampled_from(["events", "profiles"]), st.integers(0, 11)))


@given(batches, st.integers(1, 4), st.booleans())
def test_a_partition_stays_in_one_lane_in_order(
    fetched: list[tuple[str, int]], lanes: int, decided: bool
) -> None:
    records = [Record(t, p, i, b"k", b"v") for i, (t, p) in enumerate(fetched)]
    classified = [f"decision {i}" for i in range(len(records))] if decided else None
    sink = SimpleNamespace(writers=[None] * lanes)
    parts = Sink._by_lane(sink, records, classified)  # type: ignore[arg-type]
    if lanes == 1:  # the batch as it is
        assert parts == [(0, (records, classified))]
        return
    assert [lane for lane, _ in parts] == sorted({r.partition % lanes for r in records})
    seen = []
    for lane, (some, decisions) in parts:
        assert all(r.partition % lanes == lane for r in some)
        assert [r.offset for r in some] == sorted(r.offset for r in some)  # fetched order
        if decided:
            assert decisions == [f"decision {r.offset}" for r in some]
        else:
            assert decisions is None
        seen += some
    assert sorted(seen) == sorted(records)


def test_writers_are_one_or_more(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="writers must be 1 or more"):
        Sink(Settings(data_dir=tmp_path), SinkOptions(writers=0))
