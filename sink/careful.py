"""Records a sink was handling when it died, read again with care.

Before it decodes a batch, a sink marks, per partition, the offsets the batch
holds (``usertrail_in_flight``). A mark at or past a partition's stored
position, found when the partition is assigned, names records some sink of
the group was handling when it died: a SIGKILL or a crash from outside, or
a record that kills whoever decodes it (a crash in a parser, memory). Such a
record would kill every sink that reads it, for good. So the marked records
are read again in parts: an eighth of them per batch, and one at a time once
at most ``ONE_BY_ONE`` are left. A record a sink died on twice while
handling it alone becomes a dead letter (reason ``crashed``) without being
decoded again. From a 5,000-record batch that takes five deaths; a death
that was not the record's costs a few slower batches.

Pure: the sink asks it (``found`` on assignment, ``cut`` per batch).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from usertrail.sink.plan import CRASHED, DeadLetter, Record

ONE_BY_ONE = 64
"""Records in flight at a death at most, to be read again one at a time."""
DEAD_AFTER = 2
"""Deaths while handling a record alone that make it a dead letter."""

Partition = tuple[str, int]


@dataclass
class _Care:
    until: int  # the last offset that was in flight
    limit: int  # records per batch until then
    dead: int | None  # the offset to dead-letter, if any
    attempts: int


@dataclass
class Careful:
    care: dict[Partition, _Care] = field(default_factory=dict)

    def found(self, tp: Partition, position: int | None, mark: tuple[int, int, int] | None) -> bool:
        """On assignment: ``position`` the stored next offset (None: none
        stored), ``mark`` the partition's (first, last, attempts) in flight.
        True if records from ``position`` on were in flight at a death."""
        self.care.pop(tp, None)
        if mark is None:
            return False
        first, last, attempts = mark
        start = first if position is None else position
        if last < start:
            return False  # written, every one of them
        n = last - start + 1
        alone = first == last == start
        self.care[tp] = _Care(
            until=last,
            limit=1 if n <= ONE_BY_ONE else max(1, n // 8),
            dead=start if alone and attempts >= DEAD_AFTER else None,
            attempts=attempts,
        )
        return True

    def forget(self, tps: Sequence[Partition]) -> None:
        for tp in tps:
            self.care.pop(tp, None)

    @property
    def active(self) -> bool:
        """Records are being read again with care."""
        return bool(self.care)

    def cut(
        self, records: list[Record]
    ) -> tuple[list[Record], dict[Partition, int], list[DeadLetter | None] | None]:
        """A fetched batch cut to what may be handled now (while any
        partition is under care: records of one such partition only): the records kept,
        the offset to read each cut partition again from, and (when one of
        them is a record to dead-letter) what each kept record is:
        a DeadLetter, or None to decode it."""
        if not self.care:
            return records, {}, None
        first: dict[Partition, int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        for tp, start in first.items():
            care = self.care.get(tp)
            if care is not None and start > care.until:
                del self.care[tp]  # past what was in flight: as usual again
        # One partition under care per batch, and nothing else in it: a death
        # then counts against that partition's records only (the sink writes
        # such a batch before it marks the next: consumer.py)
        focus = next((tp for tp in first if tp in self.care), None)
        if focus is None:
            return records, {}, None
        care = self.care[focus]
        kept: list[Record] = []
        again: dict[Partition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            if tp == focus and r.offset < first[tp] + care.limit:
                kept.append(r)
            elif tp not in again:
                again[tp] = r.offset
        dead = [
            r
            for r in kept
            if (care := self.care.get((r.topic, r.partition))) and care.dead == r.offset
        ]
        if not dead:
            return kept, again, None
        marked = {(r.topic, r.partition, r.offset) for r in dead}
        classified: list[DeadLetter | None] = []
        for r in kept:
            if (r.topic, r.partition, r.offset) in marked:
                care = self.care[(r.topic, r.partition)]
                classified.append(
                    DeadLetter(
                        r,
                        CRASHED,
                        f"a sink died {care.attempts} times while handling this record "
                        "alone (a crash or out of memory); it was not decoded again",
                    )
                )
                care.dead = None
            else:
                classified.append(None)
        return kept, again, classified


def in_flight(records: Sequence[Record]) -> dict[Partition, tuple[int, int]]:
    """Per partition, the first and last offset of a batch."""
    out: dict[Partition, tuple[int, int]] = {}
    # a batch comes in runs of one partition's records (one per fetch)
    for tp, run in itertools.groupby(records, _partition_of):
        offsets = [r.offset for r in run]
        low, high = min(offsets), max(offsets)
        if tp in out:
            low, high = min(low, out[tp][0]), max(high, out[tp][1])
        out[tp] = (low, high)
    return out


_partition_of = operator.attrgetter("topic", "partition")
