"""The stream worker's events/s against faust's own ceiling and a raw loop,
in the same run.

One pre-filled events topic (demo traffic), then per round, each reading the
whole topic from the start under a new group:
  ceiling  a faust worker whose agent only decodes, batched with
           ``stream.take`` as the worker batches (no table): what faust
           itself can deliver here;
  worker   the real stream worker (``create_app``): fold, segments, table
           with its changelog and the published profiles, every batch's
           writes acknowledged by the broker before the next batch; it
           decodes and folds in its helper process, as by default
           (USERTRAIL_STREAM_FOLD_PROCESS=false: in its own process);
  raw      a plain aiokafka loop that decodes and folds into a dict.
Both faust figures run as worker processes, timed from their first finished
batch to their last (the group join before it is not throughput). Prints each
round and the median ratio worker/ceiling (target: >= 0.9).

    ./dev bench stream_rate [--events 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import brokers
from usertrail.producers import TrackingClient, demo
from usertrail.producers.events import decode
from usertrail.producers.ids import uuid7
from usertrail.stream.fold import Profile, fold
from usertrail.stream.segments import load_rules

from usertrail.embedded import _die_with_parent, free_port
from usertrail.settings import Settings

TOPIC = "bench.events"
PARTITIONS = 8


class Clock:
    """From the first finished batch to the one that reaches ``expected``."""

    def __init__(self, expected: int, result: Path) -> None:
        self.expected = expected
        self.result = result
        self.count = 0
        self.first: tuple[float, int] | None = None
        self.batches = 0

    def add(self, n: int) -> None:
        self.count += n
        self.batches += 1
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.count)
        if self.count >= self.expected:
            started, done = self.first
            rate = (self.count - done) / (now - started) if now > started else 0.0
            # a file: faust's worker sends whatever is printed to its log
            self.result.write_text(
                json.dumps({"events": self.count, "rate": rate, "batches": self.batches})
            )
            self.expected = sys.maxsize  # report once


def child(role: str, expected: int, result: Path) -> None:
    import faust
    from usertrail.stream.app import create_app

    from usertrail.runtime import tune_gc

    settings = Settings()
    clock = Clock(expected, result)
    if role == "worker":
        app = create_app(settings, load_rules(), web_port=free_port(), on_batch=clock.add)
    else:
        group = settings.group_options()
        datadir = settings.data_dir / "faust" / settings.stream_app_id
        datadir.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            settings.stream_app_id,
            broker=f"kafka://{settings.bootstrap_servers}",
            store="memory://",
            autodiscover=False,
            topic_disable_leader=True,
            broker_session_timeout=group["session_timeout_ms"] / 1000,
            broker_heartbeat_interval=group["heartbeat_interval_ms"] / 1000,
            broker_rebalance_timeout=group["rebalance_timeout_ms"] / 1000,
            datadir=str(datadir),
            web_port=free_port(),
            web_host="127.0.0.1",
            web_bind="127.0.0.1",
        )
        topic = app.topic(TOPIC, key_type=bytes, value_type=bytes, value_serializer="raw")

        @app.agent(topic)
        async def only_decode(stream: Any) -> None:
            # batched as the worker batches
            async for values in stream.take(settings.stream_batch_max, within=0.05):
                for value in values:
                    decode(value)
                clock.add(len(values))

    tune_gc()  # as usertrail stream does, for both
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None  # as usertrail stream does: it sets the root logger to DEBUG
    worker.execute_from_commandline()


def spawn(
    role: str, env: dict[str, str], expected: int, log: Path, result: Path, script: str = __file__
) -> Any:
    """``script --child role`` (this one's by default: bench/peers.py runs its
    own children through here too)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, script, "--child", role, "--events", str(expected)]
            + ["--result", str(result)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # never outlives the benchmark
        )


async def run_child(
    role: str, env: dict[str, str], expected: int, tmp: Path, script: str = __file__
) -> float:
    """The rate a child reports in ``tmp/ROLE.json`` (left there)."""
    log, result = tmp / f"{role}.log", tmp / f"{role}.json"
    result.unlink(missing_ok=True)
    proc = spawn(role, env, expected, log, result, script)
    try:
        deadline = time.monotonic() + 600
        while not result.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{role} gave no result:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        got = json.loads(result.read_text())
        print(f"  {role}: {got['events']:,} events in {got['batches']:,} batches", flush=True)
        return float(got["rate"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def raw_loop(
    bootstrap: str, expected: int, profiles: dict[str, Profile] | None = None
) -> float:
    """Events/s of a plain decode-and-fold loop; ``profiles`` (if given) gets
    the profiles it folded."""
    config = load_rules().affinity_config()
    consumer = brokers.reader(bootstrap, TOPIC)
    await consumer.start()
    if profiles is None:
        profiles = {}
    count, first = 0, None
    try:
        while count < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for r in records:
                    event = decode(r.value or b"")
                    user = event.user_id
                    profiles[user] = fold(
                        profiles.get(user) or Profile(user), event, r.offset, config=config
                    )
                count += len(records)
            if first is None and count:
                first = (time.perf_counter(), count)
        assert first is not None
        return (count - first[1]) / (time.perf_counter() - first[0])
    finally:
        await consumer.stop()


async def demo_topic(
    broker: brokers.Broker, folder: Path, users: int, events: int
) -> tuple[Settings, int]:
    """TOPIC (PARTITIONS partitions) holding the demo's traffic of ``users``
    users (seed 3); its settings and the events sent."""
    settings = await brokers.events_and_profiles(broker, folder, TOPIC, PARTITIONS)
    async with TrackingClient(source="demo", settings=settings) as client:
        sent = await demo.run(client, demo.plan(users=users, events=events, seed=3))
    return settings, sent


def child_env(broker: brokers.Broker, folder: Path) -> dict[str, str]:
    """The environment of a child reading TOPIC (its app id to be added)."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": TOPIC,
        "USERTRAIL_PROFILES_TOPIC": "bench.profiles",
        "USERTRAIL_EVENTS_PARTITIONS": str(PARTITIONS),
        "USERTRAIL_DATA_DIR": str(folder),
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        settings, sent = await demo_topic(broker, Path(tmp), 500, args.events)
        print(f"{sent:,} demo events in {TOPIC} ({PARTITIONS} partitions)")
        where = "a helper process" if settings.stream_fold_process else "its own process"
        print(f"the worker decodes and folds in {where}")
        env = child_env(broker, Path(tmp))
        ratios = []
        for r in range(args.rounds):
            rates = {}
            for role in ("ceiling", "worker"):
                app_env = {**env, "USERTRAIL_STREAM_APP_ID": f"bench-{role}-{uuid7()}"}
                rates[role] = await run_child(role, app_env, sent, Path(tmp))
            rates["raw"] = await raw_loop(broker.bootstrap_servers, sent)
            ratios.append(rates["worker"] / rates["ceiling"])
            print(
                f"round {r + 1}: faust ceiling {rates['ceiling']:,.0f}/s   "
                f"worker {rates['worker']:,.0f}/s   raw aiokafka fold {rates['raw']:,.0f}/s   "
                f"worker/ceiling {ratios[-1]:.2f}",
                flush=True,
            )
        median = statistics.median(ratios)
        print(f"median ratio worker/faust ceiling: {median:.2f} (target >= 0.9)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    brokers.add_argument(parser)
    parser.add_argument("--child", choices=["worker", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:  # a faust worker runs its own event loop
        child(arguments.child, arguments.events, arguments.result)
    else:
        asyncio.run(main(arguments))
