"""``fold_users``: a worker's batch as bytes in, bytes out, in the worker's
process or in the helper process (``FoldProcess``, a real child process)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from usertrail.producers.events import EventBase, encode
from usertrail.producers.profiles import encode_profile
from usertrail.stream.batch import Folded, FoldProcess, UserBatch, fold_users
from usertrail.stream.state import advance, dump_state, load_state

from tests.folding import RULES, USER, cut, event_lists, interactions

KEY = USER.encode()


def expected(batches: list[list[tuple[EventBase, int]]]) -> list[Folded | None]:
    """What each batch should give: ``advance`` over decoded events."""
    state, out = None, []
    for items in batches:
        result = advance(state, USER, items, RULES)
        if result is None:
            out.append(None)
            continue
        state = load_state(dump_state(result.state))
        message = None if result.message is None else encode_profile(result.message)
        out.append(Folded(dump_state(result.state), message))
    return out


def as_bytes(
    batches: list[list[tuple[EventBase, int]]],
) -> list[list[tuple[bytes, int, int]]]:
    """As the worker hands records over; no timestamp (-1): no time bound."""
    return [[(encode(e), offset, -1) for e, offset in items] for items in batches]


def through(records: list[list[tuple[bytes, int, int]]], table: dict[bytes, bytes]) -> list[Any]:
    out = []
    for items in records:
        (result,) = fold_users([UserBatch(KEY, table.get(KEY), items)], RULES)
        if result is not None:
            table[KEY] = result.state
        out.append(result)
    return out


@given(event_lists(erasures=True), st.lists(st.integers(0, 60), max_size=5))
def test_bytes_in_bytes_out_is_advance(events: list[EventBase], points: list[int]) -> None:
    batches = cut([(e, i) for i, e in enumerate(events)], points)
    assert through(as_bytes(batches), {}) == expected(batches)


@given(event_lists(), st.integers(1, 59))
def test_the_memo_never_stands_in_for_a_different_table_value(
    events: list[EventBase], point: int
) -> None:
    """The table lost the user (a recovery from an older changelog, say):
    the next batch folds onto what the table holds, not onto the memo."""
    batches = cut([(e, i) for i, e in enumerate(events)], [point])
    records = as_bytes(batches)
    through(records[:1], {})  # the memo now holds the state after batch 1
    assert through(records[1:], {}) == expected(batches[1:])


def test_records_that_are_not_the_users_valid_events_change_nothing() -> None:
    wire = encode(_events(1)[0])
    users = [
        UserBatch(b"someone-else", None, [(wire, 0, -1)]),  # key is not the user id
        UserBatch(KEY, None, [(b"not json", 1, -1), (wire.replace(b'"rating":', b'"x":'), 2, -1)]),
    ]
    assert fold_users(users, RULES) == [None, None]


def _events(n: int) -> list[EventBase]:
    return interactions(n, type="reading", service="tarot", theme="love", rating=5)


def _helper_pid(helper: FoldProcess) -> int:
    proc = helper._proc
    assert proc is not None
    return proc.pid


async def test_the_helper_process_folds_as_the_worker_would() -> None:
    items = [(e, i) for i, e in enumerate(_events(40))]
    batches = cut(items, [5, 17, 30])
    helper = FoldProcess(RULES)
    try:
        table: dict[bytes, bytes] = {}
        got = []
        for records in as_bytes(batches):
            (result,) = await helper.fold([UserBatch(KEY, table.get(KEY), records)])
            assert result is not None
            table[KEY] = result.state
            got.append(result)
        assert got == expected(batches)
    finally:
        await helper.close()


async def test_a_helper_that_dies_is_replaced_and_the_batch_folded_again() -> None:
    items = [(e, i) for i, e in enumerate(_events(20))]
    batches = cut(items, [10])
    want = expected(batches)
    records = as_bytes(batches)
    helper = FoldProcess(RULES)
    try:
        (first,) = await helper.fold([UserBatch(KEY, None, records[0])])
        assert first == want[0]
        dead = _helper_pid(helper)
        os.kill(dead, signal.SIGKILL)
        await asyncio.sleep(0.2)
        (second,) = await helper.fold([UserBatch(KEY, first.state, records[1])])
        assert second == want[1]
        assert _helper_pid(helper) != dead
    finally:
        await helper.close()


async def test_a_batch_cancelled_half_way_leaves_no_stale_answer_behind() -> None:
    items = [(e, i) for i, e in enumerate(_events(30))]
    batches = cut(items, [15])
    want = expected(batches)
    records = as_bytes(batches)
    helper = FoldProcess(RULES)
    try:
        await helper.start()
        first = _helper_pid(helper)
        task = asyncio.ensure_future(helper.fold([UserBatch(KEY, None, records[0])]))
        await asyncio.sleep(0)  # sent, not answered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the answer to the cancelled batch must not be taken for the next one's
        (result,) = await helper.fold([UserBatch(KEY, None, records[0] + records[1])])
        assert result is not None and result.state == want[1].state  # type: ignore[union-attr]
        assert _helper_pid(helper) != first
    finally:
        await helper.close()


async def test_close_ends_the_helper() -> None:
    helper = FoldProcess(RULES)
    await helper.start()
    proc = helper._proc
    assert proc is not None
    await helper.close()
    assert proc.returncode == 0  # it saw the end of its input and exited


class _DiesOnPoison(FoldProcess):
    """The real helper, in a process that exits at once (as a crash or the
    OOM killer would end it) when a record it is given holds POISON."""

    COMMAND = (
        "-c",
        "import os\n"
        "from usertrail.stream import batch\n"
        "fold = batch.fold_users\n"
        "def dying(users, rules):\n"
        "    if any(b'POISON' in v for u in users for v, _, _ in u.records):\n"
        "        os._exit(137)\n"
        "    return fold(users, rules)\n"
        "batch.fold_users = dying\n"
        "batch.serve()\n",
    )


async def test_a_record_that_kills_the_helper_is_found_and_left_out() -> None:
    users = [f"u{i}" for i in range(6)]
    events = {
        u: [
            e.model_copy(update={"user_id": u})
            for e in interactions(7, type="chat", service="saju")
        ]
        for u in users
    }
    poison = b'{"kind": "interaction", "POISON": 1}'
    batch = []
    for n, u in enumerate(users):
        records = [(encode(e), 10 * n + i, -1) for i, e in enumerate(events[u])]
        if u == "u3":
            records.insert(4, (poison, 99, -1))  # between the user's 4th and 5th event
        batch.append(UserBatch(u.encode(), None, records))
    helper = _DiesOnPoison(RULES)
    try:
        got = await helper.fold(batch)
        # every user folded as if the record were not there
        want = fold_users(
            [b._replace(records=[r for r in b.records if r[0] != poison]) for b in batch], RULES
        )
        assert got == want
        assert helper.left_out == [(b"u3", 99)]
    finally:
        await helper.close()
