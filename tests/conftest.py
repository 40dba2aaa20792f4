"""Factory fixtures: the real brokers and PostgreSQL, started once per session;
per-test topics and settings keep tests independent (docs/brokers.md).

Every test that takes ``broker`` (or ``settings``) runs twice: on the
embedded tansu and on Apache Kafka (one KRaft node, jars from Maven
Central). ``kafka3`` is a three-node cluster for the fault tests."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import subprocess
import tempfile
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.conn import AIOKafkaConnection
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from usertrail.apache_kafka import (
    KafkaCluster,
    archive_options,
    class_archive,
    free_cluster_port,
    java_binary,
)
from usertrail.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from usertrail.errors import EmbeddedStackError
from usertrail.kafka import never_create_topics, stop_within
from usertrail.logs import COMMAND_HANDLER
from usertrail.settings import Settings
from usertrail.topics import ensure_topics

_counter = itertools.count()

# As in every pipeline process (usertrail/kafka.py): no topic is made by
# asking for it, so a test that needs a topic makes it, whatever order the
# tests of its process run in.
never_create_topics()

# Hypothesis's wall-clock checks (200 ms an example, inputs generated fast
# enough) measure how busy the machine is: the suite runs its property tests
# on two cores beside brokers and fault tests, where a draw can take 0.4 s.
# Speed is shown by the benchmarks (bench/), never by a timed test.
hypothesis_settings.register_profile(
    "suite", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("suite")


def pytest_configure(config: pytest.Config) -> None:
    # Every process a test starts (sinks, workers, the CLI) inherits short
    # group timings, on both brokers: a SIGKILLed member's partitions move
    # in about 2 s instead of Kafka's 10 (test clusters allow sessions from
    # 1 s, see TEST_KAFKA_CONFIG); tansu needs them anyway (docs/brokers.md).
    os.environ.setdefault("USERTRAIL_GROUP_SESSION_TIMEOUT_MS", "2000")
    os.environ.setdefault("USERTRAIL_GROUP_HEARTBEAT_INTERVAL_MS", "200")
    # The SDK spools under the user's data directory by default; outside a
    # test (collection, session fixtures) a spool of the process's own.
    os.environ["USERTRAIL_SPOOL_DIR"] = tempfile.mkdtemp(prefix="usertrail-spool-")
    if not hasattr(config, "workerinput"):  # once, before xdist's workers start
        _class_archive_made()


def _class_archive_made() -> None:
    """The Kafka nodes' class-data archive, made by one node started and
    stopped (about 8 s, on a machine that has none yet): every node the
    suite starts after it loads its classes from it, and the session's own
    nodes are killed, never stopped, so none of them would write it. Without
    Java, Maven or a node that starts, nothing but a warning: the tests that
    need Kafka say what is missing themselves."""
    if archive_options(os.environ.get("KAFKA_OPTS", "")):
        return  # class sharing as KAFKA_OPTS sets it: no archive of ours
    try:
        if class_archive(java_binary()).exists():
            return
        with tempfile.TemporaryDirectory() as tmp:
            cluster = kafka_cluster(Path(tmp), brokers=1)
            try:
                cluster.start()
            finally:
                cluster.stop()
    except (EmbeddedStackError, OSError, subprocess.SubprocessError) as exc:
        logging.getLogger(__name__).warning("no class-data archive for the Kafka nodes: %s", exc)


@pytest.fixture(autouse=True)
def _spool_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and what it starts) spools into a directory of its own, so
    no test re-sends what another one spooled. Per process was not enough: a
    test that SIGKILLs a broker under an SDK left 186 events spooled, and
    the next test of that process re-sent them to its own broker (one more
    row per event than it sent)."""
    monkeypatch.setenv("USERTRAIL_SPOOL_DIR", tempfile.mkdtemp(prefix="usertrail-spool-"))


_UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suite relies on ``xdist_group`` (``./dev test`` runs ``--dist
    loadgroup``): the heavy fault tests one at a time in each of two lanes,
    one ``npm ci`` in sdk-js/ at a time. pytest-xdist tells a worker's
    groups by a suffix it adds to each test's id, which pytest 9.2 ignores
    (pytest-xdist issue 1386: every group is then spread over the workers,
    silently). On a worker of a ``--dist loadgroup`` run, a marked test
    whose id lost its suffix fails, saying why (pytest_runtest_setup)."""
    if not config.getoption("loadgroup", default=False):
        return  # not an xdist worker of a --dist loadgroup run
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_UNGROUPED] = True


# Every aiokafka connection opened in this process: by which test, from where.
_CONNECTIONS: weakref.WeakKeyDictionary[AIOKafkaConnection, tuple[str, str]] = (
    weakref.WeakKeyDictionary()
)
_running_test = ""
_opened = AIOKafkaConnection.__init__


def _tracked(self: AIOKafkaConnection, *args: Any, **kwargs: Any) -> None:
    _opened(self, *args, **kwargs)
    _CONNECTIONS[self] = (_running_test, "".join(traceback.format_stack(limit=14)[:-1]))


AIOKafkaConnection.__init__ = _tracked  # type: ignore[method-assign]


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _running_test
    _running_test = item.nodeid
    if item.stash.get(_UNGROUPED, False):
        pytest.fail(
            "pytest-xdist ignored this test's xdist_group, so it may run beside the tests "
            "it must not run with: this pytest and pytest-xdist do not work together "
            "(pytest-xdist issue 1386); install requirements.lock's versions",
            pytrace=False,
        )


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """An aiokafka client a test left open was found by the garbage
    collector during some later test of the process (once its broker's
    close was read, whenever the event loop ran again), failing that one
    with an unraisable ResourceWarning (pyproject.toml makes every warning
    an error). After the test's fixtures are torn down, a connection it
    opened that is still open fails the test that leaked it, saying where
    it was opened; then whatever else it left is collected here (only
    after tests that opened one: a collection costs about 0.1 s)."""
    global _running_test
    opened = [
        (conn, where) for conn, (test, where) in list(_CONNECTIONS.items()) if test == item.nodeid
    ]
    left = [where for conn, where in opened if conn.connected()]
    _running_test = ""
    if opened:
        del opened
        gc.collect()
    if left:
        pytest.fail(
            f"{len(left)} aiokafka connection(s) this test opened are still open "
            f"(stop every client it starts); the first was opened at:\n{left[0]}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _no_command_logging_left() -> Iterator[None]:
    """Commands run in-process (``usertrail.cli.main``) point the root
    logger at the sys.stderr of their test, which pytest closes after it:
    later tests' log lines then failed with "I/O operation on closed file".
    That handler (named by usertrail/logs.py) goes with its test; pytest's
    own capture handlers are left to pytest."""
    level = logging.root.level
    yield
    for handler in logging.root.handlers[:]:
        if handler.get_name() == COMMAND_HANDLER:
            logging.root.removeHandler(handler)
            logging.root.setLevel(level)


Broker = EmbeddedBroker | KafkaCluster

# Test clusters answer faster than Kafka's defaults: a consumer group may use
# the 2 s session the tests share with tansu, and the log cleaner looks for
# work every half second (the compaction tests).
TEST_KAFKA_CONFIG = {
    "group.min.session.timeout.ms": "1000",
    "log.cleaner.backoff.ms": "500",
}


def kafka_cluster(data_dir: Path, brokers: int) -> KafkaCluster:
    """A cluster on free ports, answering faster than Kafka's defaults."""
    port = free_cluster_port(brokers)
    heap = "512m" if brokers == 1 else "384m"
    return KafkaCluster(
        data_dir=data_dir, port=port, brokers=brokers, heap=heap, extra_config=TEST_KAFKA_CONFIG
    )


@pytest.fixture(scope="session")
def kafka1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One Apache Kafka node: the Kafka half of ``broker``, and what the
    Kafka-only tests use."""
    cluster = kafka_cluster(tmp_path_factory.mktemp("kafka"), brokers=1)
    cluster.start()
    yield cluster
    cluster.kill()  # its data goes with the test run


@pytest.fixture(scope="session", params=["tansu", "kafka"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    if request.param == "kafka":
        yield request.getfixturevalue("kafka1")
        return
    b = EmbeddedBroker(port=free_port(), log_path=tmp_path_factory.mktemp("tansu") / "log")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def kafka3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three KRaft nodes: replication factor 3, min.insync.replicas 2. Its
    tests are one module's, run one after the other (xdist_group "heavy-a"):
    the cluster goes with the module, not idling (a fifth of a core) until
    the session ends."""
    cluster = kafka_cluster(tmp_path_factory.mktemp("kafka3"), brokers=3)
    cluster.start()
    yield cluster
    cluster.kill()


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

    def make(broker: Broker, **overrides: object) -> Settings:
        name = unique("t")
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "events_topic": f"{name}.events",
            "profiles_topic": f"{name}.profiles",
            "dead_letter_topic": f"{name}.deadletter",
            "events_partitions": 4,
            "data_dir": tmp_path / "data",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(broker: Broker, settings_factory: Callable[..., Settings]) -> Settings:
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
PG15_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres15(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """Debian's PostgreSQL 15 (package postgresql-15, which `./dev test`
    installs), run by us like the embedded one: the oldest server the
    migrations are tested on."""
    if not (PG15_BIN / "postgres").exists():
        raise RuntimeError(
            f"PostgreSQL 15 is not installed ({PG15_BIN}): run the tests with `./dev test`, "
            "which installs it, or `apt-get install postgresql-15`"
        )
    pg = EmbeddedPostgres(
        data_dir=tmp_path_factory.mktemp("pg15"),
        port=free_port(),
        database="usertrail",
        bin_dir=PG15_BIN,
    )
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture
def database_url(postgres: EmbeddedPostgres) -> str:
    """A migrated database of the test's own on the embedded PostgreSQL."""
    from tests.sink.conftest import make_database

    return make_database(postgres)


@pytest.fixture(params=["pg15", "pg18"])
def database_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Fresh empty databases on Debian's PostgreSQL 15 and the embedded
    PostgreSQL 18 (each test runs on both); dropped afterwards."""
    import psycopg

    server: EmbeddedPostgres = request.getfixturevalue(
        "postgres15" if request.param == "pg15" else "postgres"
    )
    admin_url = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
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
