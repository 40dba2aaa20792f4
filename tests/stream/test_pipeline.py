"""The batch queue between faust's take and the folder (stream/pipeline.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from usertrail.stream.pipeline import BatchQueue


async def test_batches_grow_while_the_fold_is_busy() -> None:
    folded: list[list[int]] = []
    release = asyncio.Event()

    async def fold(batch: Sequence[int]) -> None:
        folded.append(list(batch))
        if len(folded) == 1:
            await release.wait()

    queue: BatchQueue[int] = BatchQueue(fold, batch_max=100)
    await queue.put([0])
    await asyncio.sleep(0)  # the first fold starts and waits
    for i in range(1, 31):
        await queue.put([i])  # thirty small batches from faust meanwhile
    release.set()
    await queue.drained()
    assert folded == [[0], list(range(1, 31))]  # one batch, in order


async def test_the_agent_waits_past_the_limit_and_a_failure_reaches_it() -> None:
    release = asyncio.Event()

    async def fold(batch: Sequence[int]) -> None:
        await release.wait()
        raise RuntimeError("the fold failed")

    queue: BatchQueue[int] = BatchQueue(fold, batch_max=10, waiting_limit=10)
    await queue.put(list(range(10)))
    await asyncio.sleep(0)
    await queue.put(list(range(10)))  # waits: 10 wait already
    put = asyncio.ensure_future(queue.put([99]))
    await asyncio.sleep(0.05)
    assert not put.done()
    release.set()
    with pytest.raises(RuntimeError, match="the fold failed"):
        await put
    assert queue.waiting == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(), max_size=30), max_size=30), st.integers(1, 40))
def test_every_record_is_folded_once_in_order(batches: list[list[int]], batch_max: int) -> None:
    async def go() -> list[int]:
        out: list[int] = []

        async def fold(batch: Sequence[int]) -> None:
            assert 0 < len(batch) <= batch_max
            await asyncio.sleep(0)
            out.extend(batch)

        queue: BatchQueue[int] = BatchQueue(fold, batch_max=batch_max)
        for b in batches:
            await queue.put(b)
        await queue.drained()
        return out

    assert asyncio.run(go()) == [x for b in batches for x in b]
