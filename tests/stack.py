"""usertrail up as a process: its environment, start, stop and what it left running."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from usertrail.apache_kafka import free_cluster_port
from usertrail.embedded import free_port


def _up_env() -> dict[str, str]:
    """The environment of a shell with nothing set: no broker or database, and
    up's own group timings (Apache Kafka refuses the suite's 2 s sessions)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
        and not k.startswith("USERTRAIL_GROUP_")
    }


def _start_up(
    tmp_path: Path,
    *extra: str,
    workers: int = 2,
    brokers: int = 1,
    ports: tuple[int, int] | None = None,
) -> tuple[subprocess.Popen[str], list[int], int, int]:
    kafka, pg = ports or (free_cluster_port(brokers), free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "usertrail.cli",
            "up",
            "--data-dir",
            str(tmp_path / "data"),
            "--kafka-port",
            str(kafka),
            "--postgres-port",
            str(pg),
            "--partitions",
            "3",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,  # as a shell starts a command: Ctrl-C reaches its group
        env={**_up_env(), "USERTRAIL_STREAM_WEB_PORT": str(free_port())},
    )
    assert proc.stdout is not None
    pids: list[int] = []
    deadline = time.monotonic() + 120
    lines = []
    ready = False
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"(postgres|tansu broker|kafka node \d+|sink|stream) pid (\d+)", line):
            pids.append(int(m.group(2)))
        if line.startswith("usertrail is up"):
            ready = True
        if ready and len(pids) == brokers + 1 + workers:
            return proc, pids, kafka, pg
    _stop(proc, signal.SIGKILL)
    raise AssertionError("usertrail up did not come up:\n" + "".join(lines))


CTRL_C = -signal.SIGINT
"""A terminal's Ctrl-C: SIGINT to the whole foreground process group."""


def _stop(proc: subprocess.Popen[str], how: int) -> str:
    """Stop ``up`` and return what it printed after the signal."""
    if how == CTRL_C:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(how)
    # to the end of the output: every process holding the pipe has exited
    rest, _ = proc.communicate(timeout=60)
    return rest


def _descendants(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out += [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _fold_helper(pids: list[int]) -> int:
    """The stream worker's fold helper (started with the worker), so the test
    sees it stop too."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in _descendants(pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "usertrail.stream.batch" in " ".join(psutil.Process(pid).cmdline()):
                    return pid
        time.sleep(0.2)
    raise AssertionError("the stream worker started no fold helper")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
