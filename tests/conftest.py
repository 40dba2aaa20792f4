"""Factory fixtures: the real embedded broker and PostgreSQL, started once per
session; per-test topics and settings keep tests independent (BROKER.md 8)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from usertrail.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from usertrail.kafka import stop_within
from usertrail.settings import Settings
from usertrail.topics import ensure_topics

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(port=free_port(), log_path=tmp_path_factory.mktemp("tansu") / "log")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedBroker]]:
    """Brokers of a test's own, for tests that stop and restart one."""
    made: list[EmbeddedBroker] = []

    def make(port: int | None = None) -> EmbeddedBroker:
        b = EmbeddedBroker(port=port or free_port(), log_path=tmp_path / f"tansu{len(made)}.log")
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(
        data_dir=tmp_path_factory.mktemp("pg"), port=free_port(), database="usertrail"
    )
    pg.start()
    yield pg
    pg.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointing at the given broker, with topics of the test's own."""

    def make(broker: EmbeddedBroker, **overrides: object) -> Settings:
        name = unique("t")
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "events_topic": f"{name}.events",
            "profiles_topic": f"{name}.profiles",
            "dead_letter_topic": f"{name}.deadletter",
            "events_partitions": 4,
            "data_dir": tmp_path / "data",
            # tansu holds a first JoinGroup for session/2 (BROKER.md 7)
            "group_session_timeout_ms": 2000,
            "group_heartbeat_interval_ms": 200,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(broker: EmbeddedBroker, settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(broker)


async def create_topics(settings: Settings) -> None:
    await ensure_topics(settings)


async def read_all(
    settings: Settings, topic: str, expected: int, timeout: float = 20.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record of a topic as (partition, key, value), read until
    ``expected`` records arrived (or the timeout, then whatever came)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[tuple[int, bytes | None, bytes | None]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < expected and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                out.extend((tp.partition, r.key, r.value) for r in records)
        # a short extra poll, so a duplicate beyond `expected` would be seen
        batch = await consumer.getmany(timeout_ms=300)
        for tp, records in batch.items():
            out.extend((tp.partition, r.key, r.value) for r in records)
    finally:
        await stop_within(consumer, 10)
    return out


__all__ = ["create_topics", "read_all", "unique"]


# --- databases ------------------------------------------------------------------------
PG15_URL = os.environ.get(
    "USERTRAIL_TEST_PG15_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _server_url(request: pytest.FixtureRequest, which: str) -> str:
    if which == "pg15":
        return PG15_URL
    pg: EmbeddedPostgres = request.getfixturevalue("postgres")
    return f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"


@pytest.fixture(params=["pg15", "pg18"])
def database_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Fresh empty databases on the machine's PostgreSQL 15 and the embedded
    PostgreSQL 18 (each test runs on both); dropped afterwards."""
    import psycopg

    admin_url = _server_url(request, request.param)
    made: list[str] = []

    def make() -> str:
        name = f"ut_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return admin_url.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
