"""The batch folder on its own (stream/folder.py): records in, states and
applied offsets out, in the order the worker's recovery relies on. The
profiles go to a real broker; the table and the consumer are the two small
faust surfaces the folder uses, kept here in memory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from usertrail.stream.batch import Folded, UserBatch, fold_users
from usertrail.stream.folder import BatchFolder
from usertrail.stream.segments import load_rules
from usertrail.stream.state import APPLIED, applied_key, load_state

from tests.conftest import Broker, create_topics, unique
from usertrail.settings import Settings
from usertrail.topics import home_partition

RULES = load_rules(None)
# users whose home (murmur2 over the tests' 4 partitions) is partition 0 and 1
ANN, BO = "ann0", "bo6"
assert (home_partition(ANN.encode(), 4), home_partition(BO.encode(), 4)) == (0, 1)


class Message(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None  # ms, as aiokafka gives it; None: unknown
    headers: tuple[tuple[str, bytes], ...] = ()


class Table:
    """faust's table as the folder sees it (the store), and its changelog."""

    def __init__(self, fail_writes: bool = False) -> None:
        self.data: dict[bytes, bytes] = {}
        self.sent: list[tuple[int, bytes, bytes]] = []
        self.fail_writes = fail_writes

    async def send_changelog(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_writes and not key.startswith(b"\x00"):
            done.set_exception(OSError("the write failed"))
        else:
            self.sent.append((partition, key, value))
            done.set_result(None)
        return done


class Consumer:
    def __init__(self) -> None:
        self.seeks: list[dict[Any, int]] = []

    async def earliest_offsets(self, *tps: Any) -> dict[Any, int]:
        return {tp: 0 for tp in tps}

    async def seek_wait(self, offsets: dict[Any, int]) -> None:
        self.seeks.append(offsets)

    def assignment(self) -> set[Any]:
        return set()


def event(user: str, n: int, partition: int, offset: int) -> Message:
    value = {
        "kind": "interaction",
        "schemaVersion": 1,
        "eventId": f"0193a3c1-aaaa-7bbb-8ccc-{n:012d}",
        "userId": user,
        "type": "chat",
        "service": "saju",
        "occurredAt": f"2026-03-01T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "source": "web",
    }
    return Message(partition, offset, user.encode(), json.dumps(value).encode())


@pytest.fixture
async def folder_for(settings_factory: Callable[..., Settings], broker: Broker) -> Any:
    settings = settings_factory(broker, stream_app_id=unique("folder"))
    await create_topics(settings)
    made: list[BatchFolder] = []

    async def fold(users: list[UserBatch]) -> list[Folded | None]:
        return fold_users(users, RULES)

    def make(
        table: Table,
        consumer: Consumer,
        marks: Table | None = None,
        fold: Callable[[list[UserBatch]], Any] = fold,
    ) -> BatchFolder:
        folder = BatchFolder(
            settings,
            table,
            consumer,
            fold,
            changelog=table.send_changelog,
            marks=None if marks is None else marks.send_changelog,
        )
        made.append(folder)
        return folder

    yield make
    for folder in made:
        await folder.close()


def _user_state(table: Table, user: str) -> Any:
    return load_state(table.data[user.encode()])


async def test_a_batch_writes_each_user_once_and_the_applied_offsets_last(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    table, consumer = Table(), Consumer()
    folder = folder_for(table, consumer)
    batch = [event(ANN, i, 0, i) for i in range(5)] + [event(BO, 10 + i, 1, i) for i in range(3)]
    await folder.fold_batch(batch)
    await folder.writes_acknowledged()
    assert _user_state(table, ANN).profile.counts_by_type == {"chat": 5}
    assert _user_state(table, BO).profile.counts_by_type == {"chat": 3}
    keys = [key for _, key, _ in table.sent]
    assert keys.count(ANN.encode()) == keys.count(BO.encode()) == 1  # one write per user and batch
    marks = {applied_key(0): b"4", applied_key(1): b"2"}
    assert {k: v for _, k, v in table.sent if k in marks} == marks
    last_state = max(i for i, k in enumerate(keys) if k in (ANN.encode(), BO.encode()))
    assert all(keys.index(k) > last_state for k in marks), "applied offsets after the states"
    assert folder.applied_offset(0) == 4
    assert consumer.seeks == []


class HeldTable(Table):
    """A changelog whose writes the test acknowledges when it chooses."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[asyncio.Future[None]] = []

    async def send_changelog(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[None]:
        self.sent.append((partition, key, value))
        self.held.append(asyncio.get_running_loop().create_future())
        return self.held[-1]


async def test_applied_offsets_sent_apart_go_only_after_every_write_is_acknowledged(
    folder_for: Callable[..., BatchFolder],
) -> None:
    """As on tansu (stream/app.py): the states in batches, the applied
    offsets through another producer. The end offset tansu reports lies past
    the newest mark only if each mark is sent after every write before it
    is acknowledged, so that no write the mark vouches for comes after it."""
    table, marks, consumer = HeldTable(), Table(), Consumer()
    folder = folder_for(table, consumer, marks)
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3)] + [event(BO, 9, 1, 0)])
    assert {k for _, k, _ in table.sent} == {ANN.encode(), BO.encode()}
    for _ in range(20):
        await asyncio.sleep(0)
    assert marks.sent == [], "a mark went out before the writes it vouches for"
    table.held[0].set_result(None)
    for _ in range(20):
        await asyncio.sleep(0)
    assert marks.sent == [], "a mark went out with a write still unacknowledged"
    for held in table.held[1:]:
        held.set_result(None)
    # (a mark sent the states' way would be held forever)
    await asyncio.wait_for(folder.writes_acknowledged(), 10)
    assert {k: v for _, k, v in marks.sent if k.startswith(APPLIED)} == {
        applied_key(0): b"2",
        applied_key(1): b"0",
    }
    assert not any(k.startswith(b"\x00") for _, k, _ in table.sent)
    assert folder.applied_offset(0) == 2
    assert _user_state(table, ANN).profile.counts_by_type == {"chat": 3}


class StuckTable(HeldTable):
    """A changelog whose first send waits for room (aiokafka's buffer full,
    a broker that stalls) until the test lets it through."""

    def __init__(self) -> None:
        super().__init__()
        self.room = asyncio.Event()

    async def send_changelog(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[None]:
        await self.room.wait()
        return await super().send_changelog(partition, key, value)


async def test_a_batch_still_folding_when_its_partitions_go_writes_nothing_more(
    folder_for: Callable[..., BatchFolder],
) -> None:
    """The drain before a rebalance gave up on a batch (stream/app.py): the
    batch stops at its next write and sends no applied offset, and giving
    the partitions up waits until what it sent is answered, so that none of
    it lands in the changelog after the partitions' next owner's writes."""
    table, consumer = StuckTable(), Consumer()
    folder = folder_for(table, consumer)
    folding = asyncio.ensure_future(
        folder.fold_batch([event(ANN, i, 0, i) for i in range(3)] + [event(BO, 9, 1, 0)])
    )
    while not folder.unwritten:  # folded; its first send waits for room
        await asyncio.sleep(0.01)
    giving_up = asyncio.ensure_future(folder.before_revoke(lambda: asyncio.shield(folding)))
    await asyncio.sleep(0.05)
    assert not giving_up.done()
    table.room.set()  # the first send goes through; nothing after it is sent
    await asyncio.wait_for(folding, 10)
    await asyncio.sleep(0.05)
    assert [k for _, k, _ in table.sent] == [ANN.encode()]
    assert not giving_up.done(), "the partitions went with a write unanswered"
    table.held[0].set_result(None)
    await asyncio.wait_for(giving_up, 10)
    assert folder.applied_offset(0) is None and folder.applied_offset(1) is None
    assert table.data == {} and folder.unwritten == {}


async def test_the_partitions_go_only_once_the_last_batchs_applied_offsets_are_answered(
    folder_for: Callable[..., BatchFolder],
) -> None:
    """A batch folded before the rebalance began keeps its applied offsets:
    they go out once its writes are acknowledged, and the partitions wait."""
    table, marks, consumer = HeldTable(), Table(), Consumer()
    folder = folder_for(table, consumer, marks)
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3)])
    giving_up = asyncio.ensure_future(folder.before_revoke())
    await asyncio.sleep(0.05)
    assert not giving_up.done()
    for held in table.held:
        held.set_result(None)
    await asyncio.wait_for(giving_up, 10)
    assert {k: v for _, k, v in marks.sent if k.startswith(APPLIED)} == {applied_key(0): b"2"}
    assert folder.applied_offset(0) == 2


async def test_redelivered_records_change_nothing_and_a_hole_is_re_read(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    table, consumer = Table(), Consumer()
    folder = folder_for(table, consumer)
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3)])
    await folder.writes_acknowledged()
    before = table.data[ANN.encode()]
    # offsets 0-2 again, then 5: 3 and 4 never came
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3)] + [event(ANN, 5, 0, 5)])
    await folder.writes_acknowledged()
    assert table.data[ANN.encode()] == before
    assert folder.applied_offset(0) == 2
    assert [list(s.values()) for s in consumer.seeks] == [[3]], "re-read from the hole"
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3, 6)])
    await folder.writes_acknowledged()
    assert _user_state(table, ANN).profile.counts_by_type == {"chat": 6}


async def test_writes_that_fail_leave_the_applied_offset_behind(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    table, consumer = Table(fail_writes=True), Consumer()
    folder = folder_for(table, consumer)
    await folder.fold_batch([event(ANN, i, 0, i) for i in range(3)])
    with pytest.raises(OSError, match="the write failed"):
        await folder.writes_acknowledged()
    assert all(k != applied_key(0) for _, k, _ in table.sent), "no offset without its writes"


async def test_records_that_are_not_events_are_passed_over(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    table, consumer = Table(), Consumer()
    folder = folder_for(table, consumer)
    await folder.fold_batch(
        [
            Message(0, 0, ANN.encode(), b"[" * 10_000),
            Message(0, 1, None, b"{}"),
            Message(0, 2, ANN.encode(), None),
            # its time is more than a day after its record's (2026-03-01 10:00)
            event(ANN, 7, 0, 3)._replace(timestamp=1772272800_000 - 2 * 86_400_000),
            event(ANN, 3, 0, 4)._replace(timestamp=1772359200_000),
        ]
    )
    await folder.writes_acknowledged()
    assert _user_state(table, ANN).profile.counts_by_type == {"chat": 1}
    assert folder.applied_offset(0) == 4


async def test_a_resend_hundreds_of_events_late_is_found_in_a_sealed_chunk(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    """Past the ids a profile holds, the folder stores sealed chunks of them
    (before the state that names them) and loads the one a late resend
    needs: the resend changes nothing (#19)."""
    table, consumer = Table(), Consumer()
    folder = folder_for(table, consumer)
    for start in range(0, 700, 100):
        await folder.fold_batch([event(ANN, i, 0, i) for i in range(start, start + 100)])
    await folder.writes_acknowledged()
    before = _user_state(table, ANN).profile
    assert before.counts_by_type == {"chat": 700} and before.sealed
    keys = [key for _, key, _ in table.sent]
    chunk_keys = [k for k in keys if k.startswith(b"\x00usertrail/seen/")]
    assert len(chunk_keys) == len(before.sealed)
    first_naming = {
        k: min(i for i, x in enumerate(keys) if x == ANN.encode() and i > keys.index(k))
        for k in chunk_keys
    }
    assert all(keys.index(k) < i for k, i in first_naming.items()), "a chunk before its state"
    # resends of the first events, after 700 newer ones, with one new event
    await folder.fold_batch([event(ANN, 0, 0, 700), event(ANN, 5, 0, 701), event(ANN, 700, 0, 702)])
    await folder.writes_acknowledged()
    after = _user_state(table, ANN).profile
    assert after.counts_by_type == {"chat": 701}
    assert after.last_offset == 702


async def test_a_record_away_from_its_home_is_copied_there_not_folded(
    folder_for: Callable[[Table, Consumer], BatchFolder],
) -> None:
    table, consumer = Table(), Consumer()
    folder = folder_for(table, consumer)
    settings = folder.settings
    away = event(ANN, 1, 1, 0)._replace(timestamp=1772272800_000)  # ANN's home is 0
    await folder.fold_batch([away, event(BO, 2, 1, 1)])
    await folder.writes_acknowledged()
    assert ANN.encode() not in table.data  # folded as its copy, when that is read
    assert _user_state(table, BO).profile.counts_by_type == {"chat": 1}
    assert folder.applied_offset(1) == 1  # past the original, the copy acknowledged
    reader = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await reader.start()
    try:
        home = TopicPartition(settings.events_topic, 0)
        reader.assign([home])
        await reader.seek_to_beginning(home)
        copies = (await reader.getmany(home, timeout_ms=10_000)).get(home, [])
    finally:
        await reader.stop()
    assert [(c.key, c.value, c.timestamp) for c in copies] == [
        (away.key, away.value, 1772272800000)
    ]
    assert ("usertrail-forwarded-from", b"1/0") in list(copies[0].headers)
