"""What the stream worker folds and when it sends: pure policy, no faust
(the worker in ``app.py`` asks it; tests ask it directly).

``Positions`` admits, per partition, exactly the record after the applied
offset kept in the table; ``then_send`` publishes a batch's profiles only
once its state writes are acknowledged.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("usertrail.stream")

RESEEK_SECONDS = 10.0
SKIP_AHEAD = 1000
"""Records below a partition's applied offset that make the worker jump
forward instead of skipping them one by one."""


class Verdict(enum.Enum):
    FOLD = "fold"  # the next record of its partition
    DONE = "done"  # at or below the applied offset: already in the state
    GAP = "gap"  # beyond the next offset: a record in between never came


class Positions:
    """Which records a worker folds: per partition, exactly the one after the
    applied offset recovered with the table. The committed group offset is
    only where faust starts reading; faust has been seen to deliver a
    partition's records with holes right after a restart and to commit past
    them. A hole is refused and the partition re-read from the applied
    offset, again every ``RESEEK_SECONDS`` until the record comes: a hole is
    never skipped (offsets going back prove nothing, since faust also seeks
    to committed offsets that lie past the hole).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.resync: dict[int, _Resync] = {}
        self.skipped: dict[int, tuple[int, float]] = {}

    def admit(self, partition: int, offset: int, applied: int | None) -> Verdict:
        if applied is None or offset == applied + 1:
            self.resync.pop(partition, None)
            return Verdict.FOLD
        if offset <= applied:
            return Verdict.DONE
        return Verdict.GAP

    def skip_to(self, partition: int, offset: int, applied: int) -> int | None:
        """Where to jump when ``offset`` lies far below the applied offset:
        ``replay stream`` moved the state ahead, and the group's committed
        offset could not follow (tansu keeps stopped members in the group,
        so it refuses a commit from outside it). Everything up to the
        applied offset is in the state, so jumping to the next is safe. Once
        per target, again after RESEEK_SECONDS."""
        if applied - offset < SKIP_AHEAD:
            return None
        want, now = applied + 1, self.clock()
        last = self.skipped.get(partition)
        if last is not None and last[0] == want and now - last[1] < RESEEK_SECONDS:
            return None
        self.skipped[partition] = (want, now)
        return want

    def should_seek(self, partition: int, want: int) -> bool:
        """Whether to seek now: once per hole, again after RESEEK_SECONDS
        without the re-read arriving."""
        now = self.clock()
        r = self.resync.get(partition)
        if r is None or r.want != want:
            r = self.resync[partition] = _Resync(want, since=now)
        elif now - r.last_at < RESEEK_SECONDS:
            return False
        else:
            log.error(
                "partition %d: offset %d still missing %.0f s after re-reading; retrying",
                partition,
                want,
                now - r.since,
            )
        r.last_at = now
        return True


@dataclass
class _Resync:
    want: int
    since: float
    last_at: float = 0.0


async def then_send(
    writes: Sequence[Awaitable[Any]], send: Callable[[], Awaitable[Sequence[Awaitable[Any]]]]
) -> None:
    """Wait for ``writes``; only when every one succeeded, ``send`` and wait
    for what it sent. A failed write raises here and nothing is sent."""
    await asyncio.gather(*writes)
    await asyncio.gather(*(await send()))
