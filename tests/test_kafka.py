"""``stop_within`` on a broker that stopped answering (a real tansu, frozen
with SIGSTOP): the stop gives up in time and leaves no connection open."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import Broker, unique
from tests.workers import sink_process
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.kafka import stop_within
from usertrail.settings import Settings


@pytest.fixture
def frozen_later(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of its own: the test freezes it."""
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()


async def _topic_t(broker: EmbeddedBroker) -> None:
    """Topic "t", made as the pipeline makes topics (a process that ran a
    sink or a stream in-process never has a topic made by asking for it)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("t", num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


def _freeze(broker: EmbeddedBroker) -> None:
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)


def _open_to(broker: EmbeddedBroker) -> list[str]:
    """This process's sockets connected to ``broker``."""
    port = int(broker.bootstrap_servers.rsplit(":", 1)[1])
    return [
        f"{c.laddr} -> {c.raddr} {c.status}"
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


async def test_a_producer_that_cannot_stop_is_closed_anyway(frozen_later: EmbeddedBroker) -> None:
    await _topic_t(frozen_later)
    producer = AIOKafkaProducer(bootstrap_servers=frozen_later.bootstrap_servers, acks="all")
    await producer.start()
    await producer.send_and_wait("t", b"delivered")
    await producer.send("t", b"never acknowledged")
    assert _open_to(frozen_later), "connected before the broker froze"
    _freeze(frozen_later)
    started = time.monotonic()
    await stop_within(producer, 1, "producer")
    assert time.monotonic() - started < 8
    assert _open_to(frozen_later) == []


async def test_a_consumer_that_cannot_stop_is_closed_anyway(frozen_later: EmbeddedBroker) -> None:
    await _topic_t(frozen_later)
    consumer = AIOKafkaConsumer(
        "t",
        bootstrap_servers=frozen_later.bootstrap_servers,
        group_id="g",
        session_timeout_ms=2000,
        heartbeat_interval_ms=200,
    )
    await consumer.start()
    await consumer.getmany(timeout_ms=3000)
    assert _open_to(frozen_later), "connected before the broker froze"
    _freeze(frozen_later)
    started = time.monotonic()
    await stop_within(consumer, 1, "consumer")
    assert time.monotonic() - started < 8
    assert _open_to(frozen_later) == []


_ASK_FOR_TOPIC = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError
from usertrail.kafka import never_create_topics

async def main(bootstrap: str, topic: str, guard: bool) -> None:
    if guard:
        never_create_topics()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        print(sorted(await producer.partitions_for(topic)))
    except (KafkaTimeoutError, UnknownTopicOrPartitionError):
        print("missing")
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "guard"))
"""


def test_the_pipeline_never_creates_a_topic_by_asking_for_it(broker: Broker) -> None:
    """aiokafka asks brokers to create every topic it names in a metadata
    request, and both brokers do (tansu always, Apache Kafka with its
    default ``auto.create.topics.enable``): asked for by a process that
    installed ``never_create_topics`` (every pipeline command and worker
    does), a missing topic stays missing; asked for without it, it is made."""
    import subprocess
    import sys

    def ask(topic: str, guard: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _ASK_FOR_TOPIC, broker.bootstrap_servers, topic, guard],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    topic = f"never-made-{os.getpid()}-{time.monotonic_ns()}"
    assert ask(topic, "guard") == "missing"
    assert ask(topic, "guard") == "missing", "the first ask made nothing"
    assert ask(topic, "plain") != "missing", "without it, asking makes the topic"
    assert ask(topic, "guard") != "missing", "an existing topic is found as before"


async def test_a_sink_without_its_topics_waits_then_names_them(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    tmp_path: Path,
) -> None:
    """A sink started before its topics exist (setup not run, or a broker
    that came back empty) makes none of them: it says once which topics are
    missing and who makes them, and after USERTRAIL_STALL_SECONDS exits 6
    naming them."""
    settings = settings_factory(broker)
    log = tmp_path / "sink.log"
    sink = sink_process(settings, database_url, log, unique("sink"), USERTRAIL_STALL_SECONDS="4")
    assert sink.wait(timeout=60) == 6, log.read_text()[-3000:]
    text = log.read_text()
    for topic in (settings.events_topic, settings.profiles_topic):
        assert f"topic {topic} does not exist on the broker; waiting" in text, text[-3000:]
        assert text.count(f"topic {topic} does not exist") == 1, "said once, not per retry"
    assert (
        f"topics {settings.events_topic}, {settings.profiles_topic} do not exist on the broker"
        in text
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    assert not {settings.events_topic, settings.profiles_topic} & existing


class _Conn:
    """A connection as ``_confirm`` uses one: ``send`` gives what it is told."""

    def __init__(self, answer: object) -> None:
        self.answer, self.closed_with = answer, None

    def send(self, request: object) -> Any:
        async def reply() -> object:
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

        return reply()

    def close(self, reason: object = None) -> None:
        self.closed_with = reason


async def test_a_topic_check_that_fails_is_an_error_the_producer_retries() -> None:
    """aiokafka's sender takes only KafkaErrors from a produce: anything else
    from the check of the topics (a timeout is asyncio's) ended its routine
    for good, and every later event was spooled."""
    from aiokafka.conn import CloseReason
    from aiokafka.errors import KafkaConnectionError, RequestTimedOutError

    from usertrail.kafka import _confirm

    silent = _Conn(TimeoutError())
    with pytest.raises(RequestTimedOutError):
        await _confirm(silent, {("t", 0)})
    assert silent.closed_with == CloseReason.CONNECTION_TIMEOUT
    with pytest.raises(KafkaConnectionError):
        await _confirm(_Conn(OSError("reset")), {("t", 0)})
    assert RequestTimedOutError.retriable and KafkaConnectionError.retriable


async def test_a_topic_check_wants_every_partition_of_the_request() -> None:
    from types import SimpleNamespace

    from aiokafka.errors import UnknownTopicOrPartitionError

    from usertrail.kafka import _confirm

    one = SimpleNamespace(topics=[(0, "t", False, [(0, 0, 111, [111], [111], [])])])
    await _confirm(_Conn(one), {("t", 0)})
    with pytest.raises(UnknownTopicOrPartitionError, match=r"t\[1\]"):
        await _confirm(_Conn(one), {("t", 0), ("t", 1)})
    missing = SimpleNamespace(topics=[(3, "t", False, [])])
    with pytest.raises(UnknownTopicOrPartitionError, match=r"t\[0\]"):
        await _confirm(_Conn(missing), {("t", 0)})
