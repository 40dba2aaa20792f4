"""The pipeline's worker processes that ``usertrail up`` runs and supervises."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from usertrail.embedded import OWNED_CHILD
from usertrail.errors import LogResetError
from usertrail.settings import Settings

log = logging.getLogger("usertrail.workers")


def instance_id(settings: Settings) -> str:
    """This ``up``'s name in its workers' groups: the host and its data
    directory (one ``up`` per data directory)."""
    where = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:10]
    return f"up-{socket.gethostname()}-{where}"


class Workers:
    """Each worker is a ``usertrail`` subcommand in a child process, restarted
    with backoff if it dies, stopped with SIGTERM (it finishes its batch)."""

    def __init__(self, settings: Settings, commands: list[list[str]]) -> None:
        self.commands = commands
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "DATABASE_URL": settings.database_dsn(),
            "USERTRAIL_DATA_DIR": str(settings.data_dir),
            "USERTRAIL_STREAM_WEB_PORT": str(settings.stream_web_port),
            "USERTRAIL_LOG_LEVEL": settings.log_level,
            "USERTRAIL_LOG_FORMAT": settings.log_format,
        }
        self.settings = settings
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, tuple[int, float]] = {}

    def _spawn(self, index: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "usertrail.cli", *self.commands[index]],
            env=self.env,
            **OWNED_CHILD,
            stdin=subprocess.DEVNULL,
        )
        self.procs[index] = proc
        log.info("%s pid %d", self.commands[index][0], proc.pid)

    def start(self) -> None:
        """Start every worker (the broker answers by now)."""
        s = self.settings
        if s.group_instance_id is None and not s.is_tansu:
            # static membership: a worker restarted here takes its partitions
            # back with no rebalance (docs/brokers.md, "Rebalance storms");
            # not on tansu, whose groups were not measured with it
            self.env["USERTRAIL_GROUP_INSTANCE_ID"] = instance_id(s)
        for index in range(len(self.commands)):
            self._spawn(index)

    def watch(self) -> None:
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if code == LogResetError.exit_code:
                # a log that is not its own: restarting cannot help (its
                # message says what to do)
                log.error(
                    "%s stopped: the log was reset (see its message)", self.commands[index][0]
                )
                del self.procs[index]
                continue
            count, since = self.restarts.get(index, (0, 0.0))
            delay = min(2.0**count, 30.0)
            if time.monotonic() - since < delay:
                continue
            log.error("%s exited with code %s; restarting", self.commands[index][0], code)
            self.restarts[index] = (count + 1, time.monotonic())
            self._spawn(index)

    def stop(self, grace: float = 30.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for index, proc in self.procs.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.commands[index][0], grace)
                proc.kill()
                proc.wait()
        self.procs.clear()
