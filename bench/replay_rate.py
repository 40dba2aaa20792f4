"""``replay stream`` events/s against a plain aiokafka consume-and-fold loop
over the same topic, in the same run.

One pre-filled events topic (default 1,000,000 interactions of 10,000 users),
then per round:
  plain   an aiokafka consumer reads the whole topic, decodes each record and
          folds it into a dict of profiles with ``fold``, one event at a time;
  replay  ``replay stream`` as the command runs it: read and fold
          (``rebuild``), then write every final state to the changelog, the
          applied offsets, the profiles and the group offsets (``publish``).
Prints each round and the median ratio replay/plain (target: >= 0.5).

    ./dev bench replay_rate [--events 1000000] [--users 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import brokers
from aiokafka import AIOKafkaProducer
from usertrail.producers.events import Interaction, build, decode, encode
from usertrail.producers.ids import uuid7
from usertrail.replay import stream as replay
from usertrail.stream.fold import Profile, fold
from usertrail.stream.segments import load_rules

from usertrail.settings import Settings

TOPIC = "bench.events"
PARTITIONS = 8


async def fill(bootstrap: str, events: int, users: int) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        pending = []
        for i in range(events):
            event = build(
                "interaction",
                event_id=uuid7(),
                user_id=f"user-{i % users}",
                occurred_at=t0 + timedelta(seconds=i),
                source="bench",
                type=("reading", "chat", "feedback")[i % 3],
                service=("saju", "tarot", "astrology")[i % 3],
                theme=("love", "career", None, "health")[i % 4],
                rating=1 + i % 5 if i % 3 != 1 else None,
            )
            assert isinstance(event, Interaction)
            pending.append(await producer.send(TOPIC, encode(event), key=event.user_id.encode()))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def plain_loop(bootstrap: str, expected: int) -> float:
    config = load_rules().affinity_config()
    consumer = brokers.reader(
        bootstrap,
        TOPIC,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    started = time.perf_counter()
    await consumer.start()
    profiles: dict[str, Profile] = {}
    count = 0
    try:
        while count < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            for records in batch.values():
                for r in records:
                    event = decode(r.value or b"")
                    user = event.user_id
                    profiles[user] = fold(
                        profiles.get(user) or Profile(user), event, r.offset, config=config
                    )
                count += len(records)
    finally:
        await consumer.stop()
    return count / (time.perf_counter() - started)


async def replay_round(settings: Settings, expected: int) -> float:
    rules = load_rules()
    started = time.perf_counter()
    rebuilt = await replay.rebuild(settings, rules)
    await replay.publish(settings, rules, rebuilt)
    assert rebuilt.records == expected, (rebuilt.records, expected)
    return expected / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        base = await brokers.events_and_profiles(broker, Path(tmp), TOPIC, PARTITIONS)
        started = time.perf_counter()
        await fill(broker.bootstrap_servers, args.events, args.users)
        print(
            f"{args.events:,} events of {args.users:,} users in {TOPIC} "
            f"({time.perf_counter() - started:.0f}s to fill)",
            flush=True,
        )
        ratios = []
        for r in range(args.rounds):
            plain = await plain_loop(broker.bootstrap_servers, args.events)
            settings = base.model_copy(update={"stream_app_id": f"bench-replay-{r}"})
            rate = await replay_round(settings, args.events)
            ratios.append(rate / plain)
            print(
                f"round {r + 1}: plain consume+fold {plain:,.0f}/s   "
                f"replay stream {rate:,.0f}/s   ratio {rate / plain:.2f}",
                flush=True,
            )
        median = statistics.median(ratios)
        print(f"median ratio replay/plain loop: {median:.2f} (target >= 0.5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    brokers.add_argument(parser)
    asyncio.run(main(parser.parse_args()))
