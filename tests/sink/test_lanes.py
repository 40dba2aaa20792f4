"""The sink's lanes (sink/consumer.py): each writer takes the batches of a
fixed share of the partitions, so a partition's records stay in one lane, in
the order they were fetched."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
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
    sink = SimpleNamespace(writers=[None] * lanes, _lane_of={})
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


@given(st.sets(st.integers(0, 63), min_size=1), st.integers(1, 4))
def test_the_lanes_share_whatever_partitions_the_group_gave(numbers: set[int], lanes: int) -> None:
    """Two sinks of a group given the even and the odd partitions each use
    every lane; a partition number is one lane in both topics."""
    sink = SimpleNamespace(writers=[None] * lanes, _lane_of={})
    assigned = [TopicPartition(t, p) for p in numbers for t in ("events", "profiles")]
    Sink.assign_lanes(sink, assigned)  # type: ignore[arg-type]
    assert set(sink._lane_of) == numbers
    counts = [list(sink._lane_of.values()).count(lane) for lane in range(lanes)]
    assert max(counts) - min(counts) <= 1  # in turn
    records = [Record(tp.topic, tp.partition, 0, b"k", b"v") for tp in assigned]
    for lane, (some, _) in Sink._by_lane(sink, records, None):  # type: ignore[arg-type]
        assert {r.partition for r in some} == {p for p, at in sink._lane_of.items() if at == lane}


async def test_drain_waits_for_every_lane_and_not_for_a_failed_one(tmp_path: object) -> None:
    sink = Sink(Settings(data_dir=tmp_path, broker="kafka"), SinkOptions(writers=2))
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)  # lane 0 took its last batch: done, not failed

    async def slow() -> None:  # lane 1 writes its batch for 0.2 s
        await sink._queues[1].get()
        await asyncio.sleep(0.2)
        sink._queues[1].task_done()
        await asyncio.sleep(60)

    sink._lanes = [done, asyncio.create_task(slow())]  # type: ignore[list-item]
    await sink._queues[1].put(None)
    started = time.monotonic()
    await sink.drain()
    assert time.monotonic() - started >= 0.2
    sink._lanes[1].cancel()

    async def failing() -> None:
        raise RuntimeError("a lane failed")

    sink._lanes = [done, asyncio.create_task(failing())]  # type: ignore[list-item]
    await sink._queues[1].put(None)  # never taken
    await asyncio.wait_for(sink.drain(), 5)
    with pytest.raises(RuntimeError, match="a lane failed"):
        sink._lane_failure()
    await sink.consumer.stop()  # never started: closed as the sink closes them
    await sink.producer.stop()


def test_writers_are_one_or_more(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="writers must be 1 or more"):
        Sink(Settings(data_dir=tmp_path), SinkOptions(writers=0))
