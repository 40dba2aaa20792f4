"""The group sequence that leaves tansu with a stale leader (docs/brokers.md,
"Stale group leader"), run in a process of its own so that the aiokafka patch
(``usertrail.kafka.adopt_stale_group_leaders``) stays out of the tests':

    A joins; B joins (a rebalance); B leaves, and A leaves at once, while the
    group is rebalancing; C joins.

Prints one JSON line: the seconds C took to be given every partition (null:
not within ``--wait``) and whether the patch took a stale leader's place.

    python -m tests.stale_leader --bootstrap HOST:PORT --topic T --group G [--fix]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

from aiokafka import AIOKafkaConsumer

from usertrail.kafka import adopt_stale_group_leaders, stop_within

GROUP_TIMING = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200}


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.stale = False

    def emit(self, record: logging.LogRecord) -> None:
        self.stale |= "stale leader" in record.getMessage()


async def _poll(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await consumer.getmany(timeout_ms=100)


async def _until(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def main(args: argparse.Namespace) -> dict[str, object]:
    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            args.topic,
            bootstrap_servers=args.bootstrap,
            group_id=args.group,
            rebalance_timeout_ms=2000,
            **GROUP_TIMING,
        )

    partitions = args.partitions
    a, b = member(), member()
    stop_ab = asyncio.Event()
    await a.start()
    polls = [asyncio.create_task(_poll(a, stop_ab))]
    assert await _until(lambda: len(a.assignment()) == partitions, 30), "A was never assigned"
    await b.start()
    polls.append(asyncio.create_task(_poll(b, stop_ab)))
    assert await _until(lambda: b.assignment() and len(a.assignment()) < partitions, 30)
    await asyncio.sleep(2)
    stop_ab.set()
    await asyncio.gather(*polls)
    await b.stop()  # LeaveGroup: the group rebalances, A still its leader ...
    await a.stop()  # ... and A leaves before it joined again

    if args.fix:
        adopt_stale_group_leaders()
    seen = _Seen()
    logging.getLogger("usertrail").addHandler(seen)
    c = member()
    stop_c = asyncio.Event()
    started = time.monotonic()

    async def joined() -> bool:
        await c.start()  # in a group that never forms, start itself may wait
        poll = asyncio.create_task(_poll(c, stop_c))
        try:
            return await _until(lambda: len(c.assignment()) == partitions, args.wait)
        finally:
            stop_c.set()
            poll.cancel()

    try:
        done = await asyncio.wait_for(joined(), args.wait)
    except TimeoutError:
        done = False
    after = time.monotonic() - started
    await stop_within(c, 5, "C")  # a member of a group that never formed may hang in stop
    return {"assigned_after": round(after, 2) if done else None, "took_over": seen.stale}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--wait", type=float, default=15)
    parser.add_argument("--fix", action="store_true")
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
