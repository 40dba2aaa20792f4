"""The embedded log outlives `usertrail up` (docs/log.md): the archive the
sink writes with its positions is restored into the new tansu before `up`
says it is up, and a broker that lost its log under running workers stops
them instead of being skipped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from usertrail.producers import TrackingClient

from tests.stack import CTRL_C, _alive, _listening, _start_up, _stop, _up_env
from usertrail.embedded import EmbeddedBroker
from usertrail.settings import Settings

Record = tuple[int, int, bytes | None, bytes | None, int, tuple[Any, ...]]


async def _log(bootstrap: str, topic: str) -> list[Record]:
    """Every record of ``topic``: partition, offset, key, value, timestamp,
    headers; read to the high-water marks of the fetches."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[Record] = []
    try:
        quiet = 0
        while quiet < 3:
            batch = await consumer.getmany(timeout_ms=300)
            quiet = 0 if batch else quiet + 1
            for tp, records in batch.items():
                out += [
                    (tp.partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers))
                    for r in records
                ]
    finally:
        await consumer.stop()
    return sorted(out)


def _send(bootstrap: str, tmp_path: Path, n: int, prefix: str) -> list[str]:
    settings = Settings(kafka_bootstrap_servers=bootstrap, data_dir=tmp_path)

    async def go() -> list[str]:
        async with TrackingClient(source="web", settings=settings) as client:
            return [
                await client.track_interaction(
                    user_id=f"{prefix}{i % 13}", type="reading", service="tarot", rating=4
                )
                for i in range(n)
            ]

    return asyncio.run(go())


def _rows(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute('SELECT id FROM "UserInteraction"'))


def _wait_rows(url: str, want: int, timeout: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(rows := _rows(url)) < want and time.monotonic() < deadline:
        time.sleep(0.3)
    return rows


def _usertrail(kafka: int, pg: int, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "usertrail.cli", *args],
        env={
            **_up_env(),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg}/usertrail",
            "USERTRAIL_DATA_DIR": str(tmp_path / "data"),
        },
        capture_output=True,
        text=True,
        timeout=180,
    )


def _verified(kafka: int, pg: int, tmp_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout  # the stream worker folds the log again
    while (checked := _usertrail(kafka, pg, tmp_path, "verify")).returncode != 0:
        assert time.monotonic() < deadline, checked.stdout + checked.stderr
        time.sleep(1)


def test_every_acknowledged_event_outlives_ctrl_c_and_sigkill_of_everything(
    tmp_path: Path,
) -> None:
    """Three lives of `up` on one data directory: traffic, Ctrl-C at once
    (the stopping sink writes what is left); traffic the moment it is up,
    then, every row written, SIGKILL of `up` and all its children; traffic
    the moment it is up again. Every acknowledged event is exactly one row,
    the log is back at its partitions and offsets, verify exits 0."""
    proc, _, kafka, pg = _start_up(tmp_path)
    bootstrap, url = f"127.0.0.1:{kafka}", f"postgresql://postgres@127.0.0.1:{pg}/usertrail"
    sent: list[str] = []
    try:
        sent += _send(bootstrap, tmp_path, 400, "a")
    finally:
        said = _stop(proc, CTRL_C)
    assert proc.returncode == 0 and "Traceback" not in said, said

    proc, _, _, _ = _start_up(tmp_path, ports=(kafka, pg))
    try:
        sent += _send(bootstrap, tmp_path, 400, "b")  # the moment `up` is up
        asyncio.run(_send_raw(bootstrap, b"not an event"))  # a dead letter
        assert _wait_rows(url, len(sent)) == sorted(sent), "each event exactly one row"
        log_before = asyncio.run(_log(bootstrap, "usertrail.events"))
        assert len(log_before) == len(sent) + 1  # and the dead letter
        # a SIGKILL loses what the sink had not written (docs/log.md): here,
        # nothing, once every row is there
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)

    proc, _, _, _ = _start_up(tmp_path, ports=(kafka, pg))
    try:
        sent += _send(bootstrap, tmp_path, 400, "c")
        assert _wait_rows(url, len(sent)) == sorted(sent), "each event exactly one row"
        log_after = asyncio.run(_log(bootstrap, "usertrail.events"))
        kept = {(b[0], b[1]) for b in log_before}
        restored = [r for r in log_after if (r[0], r[1]) in kept]
        assert restored == log_before, "same partitions, offsets, keys, values, times, headers"
        _verified(kafka, pg, tmp_path)  # profiles, rows and vectors are a fold of the log
        dead = asyncio.run(_log(bootstrap, "usertrail.deadletter"))
        assert [(r[3], dict(r[5])["reason"]) for r in dead] == [(b"not an event", b"invalid")]
    finally:
        _stop(proc, CTRL_C)


async def _send_raw(bootstrap: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await (await producer.send("usertrail.events", value, key=b"someone"))
    finally:
        await producer.stop()


def test_a_crash_loses_only_what_the_sink_had_not_written(tmp_path: Path) -> None:
    """SIGKILL of everything mid-traffic: the window docs/log.md names. The
    restored log is exactly what was written: rows, log and profiles agree,
    and every row is an acknowledged event."""
    proc, _, kafka, pg = _start_up(tmp_path)
    bootstrap, url = f"127.0.0.1:{kafka}", f"postgresql://postgres@127.0.0.1:{pg}/usertrail"
    acked: list[str] = []  # delivered, as flush() reported
    issued: list[str] = []  # handed to the SDK (the last of them maybe delivered)
    settings = Settings(kafka_bootstrap_servers=bootstrap, data_dir=tmp_path)

    killed = threading.Event()

    async def send() -> None:
        async with TrackingClient(source="web", settings=settings) as client:
            chunk: list[str] = []
            for i in range(40_000):
                if killed.is_set():
                    return
                chunk.append(
                    await client.track_interaction(
                        user_id=f"c{i % 31}", type="reading", service="tarot"
                    )
                )
                issued.append(chunk[-1])
                if len(chunk) == 200:
                    if (await client.flush()).spooled:
                        return  # the broker is gone
                    acked.extend(chunk)
                    chunk = []
                    await asyncio.sleep(0.01)

    sender = threading.Thread(target=lambda: asyncio.run(send()), daemon=True)
    sender.start()
    try:
        assert len(_wait_rows(url, 3000, timeout=60)) >= 3000
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        killed.set()
        proc.communicate(timeout=60)
    sender.join(timeout=120)
    assert not sender.is_alive()
    proc, _, _, _ = _start_up(tmp_path, ports=(kafka, pg))
    try:
        written = _rows(url)  # before the restored log's records could be written again
        log_after = asyncio.run(_log(bootstrap, "usertrail.events"))
        assert len(log_after) == len(written), "the restored log is what the sink had written"
        assert set(written) <= set(issued), "every row is an event that was sent"
        assert len(issued) > len(written) >= 3000, "the kill fell mid-traffic"
        lost = len(set(acked) - set(written))
        print(f"acknowledged {len(acked)}, written {len(written)}, lost {lost} (the window)")
        _verified(kafka, pg, tmp_path)
        assert _rows(url) == written
    finally:
        _stop(proc, CTRL_C)


def test_a_broker_that_lost_its_log_stops_the_workers(tmp_path: Path) -> None:
    """tansu restarted alone under a running sink and stream, and new traffic
    sent to it: both stop with exit code 3 and the message, nothing of the new
    log is written; `sink --on-log-reset start-over` then writes the new log
    with every earlier row kept."""
    proc, pids, kafka, pg = _start_up(tmp_path)
    bootstrap, url = f"127.0.0.1:{kafka}", f"postgresql://postgres@127.0.0.1:{pg}/usertrail"
    output: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    fresh = EmbeddedBroker(port=kafka, log_path=tmp_path / "tansu2.log")
    try:
        old = _send(bootstrap, tmp_path, 300, "d")
        assert len(_wait_rows(url, len(old))) == len(old)
        _verified(kafka, pg, tmp_path)
        tansu = [p for p in pids if "tansu" in " ".join(_cmdline(p))]
        assert len(tansu) == 1
        os.kill(tansu[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _listening(kafka):
            assert time.monotonic() < deadline, "the killed tansu still listens"
            time.sleep(0.1)
        fresh.start()  # empty, as a restarted embedded broker is
        made = _usertrail(kafka, pg, tmp_path, "up", "--only-setup", "--kafka-port", str(kafka))
        assert made.returncode == 0, made.stderr
        new = _send(bootstrap, tmp_path, 300, "e")
        deadline = time.monotonic() + 60
        while sum("stopped: the log was reset" in line for line in output) < 2:
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.3)
        text = "".join(output)
        assert "the broker's log is not the one the stored positions" in text
        assert "the broker's log is not the one the stream's state" in text
        assert _rows(url) == sorted(old), "nothing of the new log was written"
        log = tmp_path / "start-over.log"
        with log.open("w") as sink_log:
            over = subprocess.Popen(
                [sys.executable, "-m", "usertrail.cli", "sink", "--on-log-reset", "start-over"],
                env={
                    **_up_env(),
                    "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                    "DATABASE_URL": url,
                    "USERTRAIL_DATA_DIR": str(tmp_path / "data"),
                },
                stdout=subprocess.DEVNULL,
                stderr=sink_log,
            )
        try:
            rows = _wait_rows(url, len(old) + len(new))
        finally:
            over.send_signal(signal.SIGTERM)
            over.wait(timeout=60)
        err = log.read_text()
        assert rows == sorted(old + new), err[-20000:]
        assert over.returncode == 0 and "starting over" in err, err[-20000:]
        # the stream's documented recovery: fold the new log from its start
        replayed = _usertrail(kafka, pg, tmp_path, "replay", "stream")
        assert replayed.returncode == 0, replayed.stderr
        assert "into 13 profiles" in replayed.stdout, replayed.stdout
    finally:
        _stop(proc, CTRL_C)
        fresh.stop()


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []


def _postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def test_up_keeps_its_database_through_pg_ctl_restart(tmp_path: Path) -> None:
    """`pg_ctl restart` of `up`'s PostgreSQL (a new server pid, outside up's
    children): the sink resumes at its stored positions; Ctrl-C stops the new
    server too. Restarted again, then `up` SIGKILLed with its whole group (the
    server, in a session of its own, survives): the next `up` on the same data
    directory stops the leftover and starts its own."""
    from usertrail.embedded import EmbeddedPostgres

    proc, _, kafka, pg = _start_up(tmp_path)
    bootstrap, url = f"127.0.0.1:{kafka}", f"postgresql://postgres@127.0.0.1:{pg}/usertrail"
    pgdata = tmp_path / "data" / "postgres" / "pgdata"
    server = EmbeddedPostgres(data_dir=pgdata.parent, port=pg, database="x")
    pg_ctl = server.bin_dir() / "pg_ctl"
    ids = server._run_as()  # as root: its own user and group, as `up` runs it
    as_owner: dict[str, Any] = {} if ids is None else {"user": ids[0], "group": ids[1]}

    def restart() -> int:
        before = _postmaster(pgdata)
        done = subprocess.run(
            # -l: the new server writes to up's log, not to our pipes
            [str(pg_ctl), "restart", "-D", str(pgdata), "-m", "fast", "-w", "-t", "60"]
            + ["-l", str(pgdata.parent / "postgres.log")],
            capture_output=True,
            text=True,
            timeout=120,
            **as_owner,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        after = _postmaster(pgdata)
        assert after != before and _alive(after)
        return after

    sent: list[str] = []
    try:
        sent += _send(bootstrap, tmp_path, 200, "p")
        assert len(_wait_rows(url, len(sent))) == len(sent)
        server = restart()
        sent += _send(bootstrap, tmp_path, 200, "q")
        assert _wait_rows(url, len(sent)) == sorted(sent), "the sink went on after the restart"
        _verified(kafka, pg, tmp_path)
    finally:
        said = _stop(proc, CTRL_C)
    assert proc.returncode == 0 and "Traceback" not in said, said
    assert not _alive(server) and not _listening(pg), "Ctrl-C stopped the new server"

    proc, _, _, _ = _start_up(tmp_path, ports=(kafka, pg))
    try:
        server = restart()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert _alive(server) and _listening(pg), "the restarted server outlives `up`"
    proc, _, _, _ = _start_up(tmp_path, ports=(kafka, pg))
    try:
        assert not _alive(server), "the next `up` stopped the leftover server"
        sent += _send(bootstrap, tmp_path, 100, "r")
        assert _wait_rows(url, len(sent)) == sorted(sent)
    finally:
        said = _stop(proc, CTRL_C)
    assert proc.returncode == 0 and "Traceback" not in said, said
    assert not _listening(pg)
