"""Fetched events wait here while the folder works on the batch before.

Each fetch's records of the events topic are handed over in one call
(stream/consumer.py). If the fold and its writes ran in that call, a loaded
worker would fold batches of one fetch each, each paying the same round
trips (the log's identity, the writes' acknowledgements, the applied
offsets), and fall behind the traffic for good. Here the fetch loop only
hands records over; the folder, when free, takes everything that waits (up
to ``batch_max``) as its next batch. A busy CPU or a slow broker makes
batches bigger, not the backlog longer (natural batching), and a batch at a
trickle waits for nothing.

The handed-over records count as acknowledged for faust's commits, so
faust may commit offsets ahead of what is folded; the applied offsets in the
table decide what is folded, and a restarted worker re-reads from them
(stream/app.py, module notes). ``waiting_limit`` events at most wait: past
it, the hand-over waits for room, so the consumer is held back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    def __init__(
        self,
        fold: Callable[[Sequence[T]], Awaitable[None]],
        batch_max: int,
        waiting_limit: int | None = None,
    ) -> None:
        self._fold = fold
        self._batch_max = batch_max
        self._limit = waiting_limit or 2 * batch_max
        self._waiting: list[T] = []
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def put(self, records: Sequence[T]) -> None:
        """Hand a batch over; waits only while ``waiting_limit`` events wait.
        Raises what a fold raised, as the fold itself did in the agent."""
        self._raise_failure()
        while len(self._waiting) >= self._limit:
            self._room.clear()
            await self._room.wait()
            self._raise_failure()
        self._waiting.extend(records)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def drained(self) -> None:
        """Everything handed over so far folded (before a rebalance, a stop).
        A fold's failure is left for the agent's next ``put`` to raise."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def discard(self) -> int:
        """Forget what waits (a stopping worker folds nothing more)."""
        dropped = len(self._waiting)
        self._waiting.clear()
        self._room.set()
        return dropped

    def _raise_failure(self) -> None:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._batch_max]
                del self._waiting[: self._batch_max]
                self._room.set()
                await self._fold(batch)
        except Exception as exc:  # noqa: BLE001  # the agent raises it at its next put
            self._failed = exc
            self._waiting.clear()
            self._room.set()
        finally:
            self._task = None
