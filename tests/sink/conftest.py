"""Sink fixtures: a migrated database of the test's own on the embedded
PostgreSQL, and a sink running in-process until a condition holds."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from usertrail.migrations import runner
from usertrail.sink.consumer import Sink, SinkOptions

from tests.conftest import Broker, create_topics
from usertrail.embedded import EmbeddedPostgres
from usertrail.settings import Settings

_dbs = itertools.count()


def make_database(pg: EmbeddedPostgres) -> str:
    name = f"sink_{os.getpid()}_{next(_dbs)}"
    with psycopg.connect(
        f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"
    engine = runner.make_engine(Settings(database_url=url))
    runner.upgrade(engine)
    engine.dispose()
    return url


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


async def run_sink_until(
    settings: Settings,
    done: Callable[[], Awaitable[bool]] | Callable[[], bool],
    options: SinkOptions | None = None,
    timeout: float = 60.0,
) -> Sink:
    sink = Sink(settings, options or SinkOptions())
    task = asyncio.create_task(sink.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            ready = done()
            if not isinstance(ready, bool):
                ready = await ready
            if ready:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the sink did not get there in time")
    finally:
        sink.stop()
        await asyncio.wait_for(task, 30)
    return sink


@pytest.fixture
async def settings(
    broker: Broker, settings_factory: Callable[..., Settings], database_url: str
) -> Settings:
    """What a sink test starts from: its own database, and the topics created."""
    settings = settings_factory(broker, database_url=database_url)
    await create_topics(settings)
    return settings
