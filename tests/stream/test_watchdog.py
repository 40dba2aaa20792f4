"""The stream worker's watchdog (stream/watchdog.py) on a clock of its own:
what it calls stuck, what it does about it, and what it leaves alone. The
recovery and consumer here are the few attributes of faust's it reads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
from usertrail.stream import watchdog as watchdog_module
from usertrail.stream.watchdog import RECOVERY_STALL_SECONDS, Watchdog

from usertrail.errors import StalledError
from usertrail.settings import Settings

BOUND = 60.0


class TP(NamedTuple):
    topic: str
    partition: int


class Signal:
    def __init__(self) -> None:
        self.times = 0

    def set(self) -> None:
        self.times += 1


@dataclass
class Recovery:
    in_recovery: bool = False
    active_offsets: dict[TP, int] = field(default_factory=dict)
    active_highwaters: dict[TP, int] = field(default_factory=dict)
    signal_recovery_start: Signal = field(default_factory=Signal)

    def active_remaining_total(self) -> int:
        return sum(
            max(0, h - self.active_offsets.get(tp, -1)) for tp, h in self.active_highwaters.items()
        )


class Consumer:
    def __init__(self) -> None:
        self.assigned: dict[TP, int] = {}  # tp -> high-water mark

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def highwater(self, tp: TP) -> int:
        return self.assigned[tp]


class Folder:
    def __init__(self) -> None:
        self.applied: dict[int, int] = {}
        self.folded_at = 0.0
        self.closing = False

    async def applied_or_before_start(self, partition: int) -> int:
        return self.applied.get(partition, -1)


class Tables:
    def __init__(self) -> None:
        self.recovery = Recovery()


class App:
    def __init__(self) -> None:
        self.tables = Tables()
        self.consumer = Consumer()
        self.rebalancing = False


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world() -> tuple[App, Folder, Clock, list[StalledError], Watchdog]:
    app, folder, clock, stops = App(), Folder(), Clock(), []
    settings = Settings(stall_seconds=BOUND, events_topic="events")
    dog = Watchdog(app, folder, settings, stop=stops.append, clock=clock)  # type: ignore[arg-type]
    return app, folder, clock, stops, dog


async def run(dog: Watchdog, clock: Clock, seconds: float, step: float = 5.0) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        await dog.check()


async def test_recovery_that_stops_moving_is_started_again_then_given_up(world: Any) -> None:
    app, _, clock, stops, dog = world
    dog.assigned()
    tp = TP("changelog", 0)
    recovery = app.tables.recovery
    recovery.in_recovery = True
    recovery.active_highwaters = {tp: 100}
    recovery.active_offsets = {tp: 40}
    await run(dog, clock, RECOVERY_STALL_SECONDS - 5)
    assert recovery.signal_recovery_start.times == 0, "too early"
    await run(dog, clock, 10)
    assert recovery.signal_recovery_start.times == 1
    assert dog.health() == (True, "recovering")
    await run(dog, clock, BOUND)
    assert recovery.signal_recovery_start.times >= 2
    assert len(stops) == 1 and "table recovery made no progress" in str(stops[0])
    assert stops[0].exit_code == 6
    assert dog.health()[0] is False


async def test_recovery_that_moves_is_left_alone_however_long(world: Any) -> None:
    app, _, clock, stops, dog = world
    dog.assigned()
    tp = TP("changelog", 0)
    recovery = app.tables.recovery
    recovery.in_recovery = True
    recovery.active_highwaters = {tp: 10_000}
    for offset in range(0, 10_000, 100):
        recovery.active_offsets = {tp: offset}
        await run(dog, clock, 5)
    assert clock.now > 3 * BOUND
    assert recovery.signal_recovery_start.times == 0 and stops == []


async def test_a_group_that_never_assigns_stops_the_worker(world: Any) -> None:
    _, _, clock, stops, dog = world
    await run(dog, clock, BOUND - 5)
    assert stops == []
    await run(dog, clock, 10)
    assert len(stops) == 1 and "no partitions assigned" in str(stops[0])


async def test_an_empty_assignment_is_an_idle_worker_not_a_stuck_one(world: Any) -> None:
    _, _, clock, stops, dog = world
    dog.revoked()
    dog.assigned()  # more workers than partitions: nothing for this one
    await run(dog, clock, 5 * BOUND)
    assert stops == [] and dog.health() == (True, "serving")


async def test_behind_and_folding_nothing_stops_the_worker_idle_does_not(world: Any) -> None:
    app, folder, clock, stops, dog = world
    dog.assigned()
    app.consumer.assigned = {TP("events", 0): 50, TP("events", 1): 7}
    folder.applied = {0: 49, 1: 6}  # at the end: idle
    await run(dog, clock, 3 * BOUND)
    assert stops == []
    app.consumer.assigned[TP("events", 1)] = 20  # new records that never get folded
    await run(dog, clock, BOUND - 5)
    assert stops == []
    await run(dog, clock, 10)
    assert len(stops) == 1
    assert "nothing folded" in str(stops[0]) and "events[1] applied 6 of 20" in str(stops[0])


async def test_a_worker_that_is_stopping_is_watched_no_more(
    world: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A check that fails while the worker runs is said (and the watchdog
    goes on); once the worker begins to stop (its folder closes) the
    watchdog ends without a word: `up`'s Ctrl-C said "the watchdog's check
    failed: RuntimeError('Event loop is closed')" as faust's consumer
    thread's loop closed under a check."""
    app, folder, _, _, dog = world
    monkeypatch.setattr(watchdog_module, "CHECK_SECONDS", 0.01)

    def closed() -> set[TP]:
        raise RuntimeError("Event loop is closed")

    dog.assigned()
    app.consumer.assignment = closed
    watching = asyncio.create_task(dog.run())
    await asyncio.sleep(0.1)
    assert "the watchdog's check failed" in caplog.text and not watching.done()
    caplog.clear()
    folder.closing = True
    await asyncio.wait_for(watching, 1)
    assert "watchdog" not in caplog.text
