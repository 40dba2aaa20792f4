"""`usertrail up` starts the embedded stack and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack import (
    CTRL_C,
    _alive,
    _descendants,
    _fold_helper,
    _listening,
    _start_up,
    _stop,
    _up_env,
)
from usertrail.embedded import free_port


@pytest.mark.parametrize(
    "how",
    [CTRL_C, signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
    ids=["ctrl-c", "int", "term", "kill"],
)
def test_up_then_stop_leaves_no_process(tmp_path: Path, how: int) -> None:
    proc, pids, kafka, pg = _start_up(tmp_path)
    assert len(pids) == 4, "broker, database, stream and sink"
    helper = _fold_helper(pids)
    everything = _descendants(pids)
    assert len(everything) > 2, "postgres runs its helper processes"
    assert helper in everything
    assert _listening(kafka) and _listening(pg)

    started = time.monotonic()
    said = _stop(proc, how)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in everything):
        time.sleep(0.1)
    assert [p for p in everything if _alive(p)] == []
    assert not _listening(kafka) and not _listening(pg)
    if how != signal.SIGKILL:
        assert proc.returncode == 0
        # workers first, then the broker and the database: an orderly stop
        assert time.monotonic() - started < 20, said
        assert "Traceback" not in said and "killing" not in said, said


def test_up_creates_topics_with_their_configuration(tmp_path: Path) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    proc, _, kafka, _ = _start_up(tmp_path)
    try:

        async def describe() -> tuple[dict[str, int], dict[str, dict[str, str]]]:
            admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{kafka}")
            await admin.start()
            try:
                names = ["usertrail.events", "usertrail.profiles", "usertrail.deadletter"]
                topics = await admin.describe_topics(names)
                from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

                configs = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
                )
                found = {}
                for response in configs:
                    for resource in response.resources:
                        found[resource[3]] = {entry[0]: entry[1] for entry in resource[4]}
                return {t["topic"]: len(t["partitions"]) for t in topics}, found
            finally:
                await admin.close()

        partitions, configs = asyncio.run(describe())
        assert partitions == {
            "usertrail.events": 3,
            "usertrail.profiles": 3,
            "usertrail.deadletter": 1,
        }
        assert configs["usertrail.events"]["retention.ms"] == "-1"
        assert configs["usertrail.profiles"]["cleanup.policy"] == "compact"
    finally:
        _stop(proc, signal.SIGINT)


def test_every_subcommand_has_help() -> None:
    import argparse

    from usertrail.cli import build_parser

    def leaves(
        parser: argparse.ArgumentParser, path: str
    ) -> list[tuple[str, argparse.ArgumentParser]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(path, parser)]
        return [leaf for name, p in subs[0].choices.items() for leaf in leaves(p, f"{path} {name}")]

    found = leaves(build_parser(), "usertrail")
    assert {"usertrail up", "usertrail db migrate", "usertrail db check"} <= {n for n, _ in found}
    for name, subparser in found:
        assert subparser.description, name
        assert "--bootstrap-servers" in subparser.format_help(), name


def test_up_runs_the_pipeline_events_become_rows(tmp_path: Path) -> None:
    import asyncio

    import psycopg
    from usertrail.producers import TrackingClient

    from usertrail.settings import Settings

    proc, _, kafka, pg = _start_up(tmp_path)
    try:
        settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{kafka}", data_dir=tmp_path)

        async def send() -> list[str]:
            async with TrackingClient(source="web", settings=settings) as client:
                return [
                    await client.track_interaction(
                        user_id=f"u{i}", type="reading", service="tarot", rating=5
                    )
                    for i in range(20)
                ]

        ids = asyncio.run(send())
        url = f"postgresql://postgres@127.0.0.1:{pg}/usertrail"
        deadline = time.monotonic() + 60
        rows: list[tuple[str]] = []
        while time.monotonic() < deadline and len(rows) < 20:
            with psycopg.connect(url) as conn:
                rows = conn.execute('SELECT id FROM "UserInteraction"').fetchall()
            time.sleep(0.2)
        assert sorted(r[0] for r in rows) == sorted(ids)
    finally:
        _stop(proc, signal.SIGINT)


@pytest.mark.xdist_group("heavy-b")
def test_up_runs_apache_kafka_whose_log_outlives_it(tmp_path: Path) -> None:
    """`up --broker kafka --brokers 3`: three KRaft nodes from Maven Central's
    jars, the pipeline on them, nothing left after Ctrl-C, and the log (a
    real one) still there when `up` starts again on the same data directory."""
    import asyncio

    import psycopg
    from usertrail.producers import TrackingClient

    from tests.conftest import read_all
    from usertrail.settings import Settings

    args = ("--broker", "kafka", "--brokers", "3")
    proc, pids, kafka, pg = _start_up(tmp_path, *args, brokers=3)
    bootstrap = ",".join(f"127.0.0.1:{kafka + i}" for i in range(3))
    settings = Settings(kafka_bootstrap_servers=bootstrap, data_dir=tmp_path)
    url = f"postgresql://postgres@127.0.0.1:{pg}/usertrail"

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "usertrail.cli", "verify", "--data-dir", str(tmp_path / "data")],
            env={**_up_env(), "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=180,
        )

    try:
        assert settings.replicas() == 3 and not settings.is_tansu

        async def send() -> list[str]:
            async with TrackingClient(source="web", settings=settings) as client:
                assert client.idempotent
                return [
                    await client.track_interaction(user_id=f"u{i % 7}", type="chat", service="saju")
                    for i in range(300)
                ]

        ids = asyncio.run(send())
        deadline = time.monotonic() + 90
        rows: list[tuple[str]] = []
        while time.monotonic() < deadline and len(rows) < len(ids):
            with psycopg.connect(url) as conn:
                rows = conn.execute('SELECT id FROM "UserInteraction"').fetchall()
            time.sleep(0.3)
        assert sorted(r[0] for r in rows) == sorted(ids)
        deadline = time.monotonic() + 90  # the stream worker folds them too
        while (checked := verify()).returncode != 0:
            assert time.monotonic() < deadline, checked.stdout + checked.stderr
            time.sleep(1)
        everything = _descendants(pids)
    finally:
        said = _stop(proc, CTRL_C)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in everything):
        time.sleep(0.1)
    assert [p for p in everything if _alive(p)] == []
    assert not any(_listening(kafka + i) for i in range(3))
    assert proc.returncode == 0 and "Traceback" not in said, said

    proc, _, _, _ = _start_up(tmp_path, *args, brokers=3, ports=(kafka, pg))
    try:
        records = asyncio.run(read_all(settings, settings.events_topic, expected=len(ids)))
        assert len(records) == len(ids), "every event is still in the log"
        checked = verify()  # the profiles and rows of before, from the log kept
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        _stop(proc, CTRL_C)


def test_a_second_up_on_the_same_data_directory_says_one_runs(tmp_path: Path) -> None:
    proc, _, _, _ = _start_up(tmp_path, "--workers", "none", workers=0)
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "usertrail.cli",
                "up",
                "--data-dir",
                str(tmp_path / "data"),
                "--kafka-port",
                str(free_port()),
                "--postgres-port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=_up_env(),
        )
        assert second.returncode == 2, second.stderr
        assert "another `usertrail up` is running on" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and proc.poll() is None
    finally:
        _stop(proc, CTRL_C)


def test_version() -> None:
    import importlib.metadata

    from usertrail import __version__

    assert __version__ == importlib.metadata.version("usertrail") != "0.0.0+unknown"

    shown = subprocess.run(
        [sys.executable, "-m", "usertrail.cli", "--version"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and shown.stdout.strip() == f"usertrail {__version__}"
