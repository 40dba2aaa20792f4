"""Apache Kafka (KRaft) on this machine: the production engine, run by us.

The broker's jars come from Maven Central through Maven, once, into a cache
(``$XDG_CACHE_HOME/usertrail/kafka-<version>``); Java 17 or newer runs them.
Each node is a combined broker and controller on loopback: 1 node, or 3
with replication factor 3 and ``min.insync.replicas`` 2. Like the rest of
the embedded stack, every node is our child, in a process group of its own,
and dies with us; its data lives under the data directory and survives a
restart (it is a real log: formatted once, never again).

Why 4.1: aiokafka 0.14 and faust-streaming 0.15 speak it (the protocol
versions Kafka 4.0 removed are ones they no longer send by default), it is
KRaft-only like every Kafka our users will start now, and its idempotent
producer, compaction and group coordinator are what production runs.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from usertrail.embedded import OWNED_CHILD, _Child, _port_free, _wait_for_port
from usertrail.errors import BrokerUnavailableError, EmbeddedStackError
from usertrail.kafka import probe

log = logging.getLogger("usertrail.kafka")

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
JAVA_MIN = 17

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>usertrail.local</groupId>
  <artifactId>apache-kafka-broker</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <!-- the broker logs through slf4j 1.7; this routes it to log4j 2 -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usertrail" / f"kafka-{KAFKA_VERSION}"


def java_binary() -> str:
    """``java`` of version 17 or newer, or a one-line error naming what to install."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise EmbeddedStackError(
            f"Apache Kafka needs Java {JAVA_MIN} or newer and no `java` was found: install "
            "one (Debian: apt-get install openjdk-17-jre-headless), or set JAVA_HOME"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = 0
    if found:
        major = int(found.group(1))
        if major == 1 and found.group(2):  # "1.8.0_x" is Java 8
            major = int(found.group(2))
    if major < JAVA_MIN:
        raise EmbeddedStackError(
            f"Apache Kafka needs Java {JAVA_MIN} or newer; {java} is Java {major or '?'}: "
            "install one (Debian: apt-get install openjdk-17-jre-headless), or set JAVA_HOME"
        )
    return java


def jars() -> Path:
    """The folder of the broker's jars, fetched with Maven the first time."""
    root = cache_dir()
    lib = root / "lib"
    if (root / "complete").exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    # two first runs at once (two `up`s, a suite beside an `up`) fetch once
    with (root / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "complete").exists():
            _fetch(root, lib)
    return lib


def _fetch(root: Path, lib: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EmbeddedStackError(
            "Apache Kafka's jars are fetched from Maven Central with Maven, and no `mvn` "
            "was found: install it (Debian: apt-get install maven)"
        )
    (root / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, scala=SCALA_VERSION))
    staging = root / "lib.partial"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("fetching Apache Kafka %s with Maven into %s", KAFKA_VERSION, root)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(root / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise EmbeddedStackError(
            f"Maven could not fetch Apache Kafka {KAFKA_VERSION}: {' | '.join(tail)}"
        )
    shutil.rmtree(lib, ignore_errors=True)
    staging.rename(lib)
    (root / "complete").write_text(KAFKA_VERSION + "\n")


def free_cluster_port(brokers: int) -> int:
    """A base port for a cluster of ``brokers`` nodes (their client ports in a
    row, the controllers 100 above) that is free now and stays clear of the
    kernel's ephemeral range: the nodes' own outgoing connections take ports
    from that range and were seen to take a controller's port before it was
    bound."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10_000, max(10_001, low - 100 - brokers))
        wanted = [port + i for i in range(brokers)] + [port + 100 + i for i in range(brokers)]
        if all(_port_free(p) for p in wanted):
            return port
    raise EmbeddedStackError("no free ports for a Kafka cluster below the ephemeral range")


JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
"""How the nodes this module runs (for `up`, the tests and the benchmarks:
short-lived, on a machine shared with everything else) use the JVM. C1 only:
HotSpot's C2 compiler took about a third of a core through the first minute
of `up --broker kafka` at 1,000 events/s, as much as the node's request
handling; compiled with C1 alone, a node took half the CPU to start (3.7 CPU-s
against 7.0) and its CPU under that load settled at once where C2's reaches
only after minutes (25-35% of a core against 65 falling to 28). The serial
collector: a heap of at most 1 GB, no concurrent collector threads (3.3
CPU-s to start, 2.5 against 3.0 for 10,000 sends). ``KAFKA_OPTS`` overrides
either (``jvm_options``): a long-running node may want
``-XX:TieredStopAtLevel=4 -XX:+UseG1GC``."""


def _selects_collector(option: str) -> bool:
    return option.startswith("-XX:+Use") and option.endswith("GC")


def jvm_options(extra: str) -> list[str]:
    """``JVM_OPTIONS``, then ``extra`` (``KAFKA_OPTS``, as Kafka's own start
    scripts take it). The JVM takes the last of a repeated flag, but refuses
    to start with two collectors: a collector in ``extra`` replaces ours."""
    options = shlex.split(extra)
    ours = list(JVM_OPTIONS)
    if any(_selects_collector(o) for o in options):
        ours = [o for o in ours if not _selects_collector(o)]
    return ours + options


def class_archive(java: str) -> Path:
    """Where the nodes' class-data archive (the JVM's AppCDS) for ``java``
    lives: beside the jars, one per Java installation (an archive holds
    classes as one JVM build laid them out)."""
    real = Path(java).resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / f"classes-{key[:16]}.jsa"


_CLASS_SHARING = (
    "Xshare",
    "SharedArchiveFile",
    "ArchiveClassesAtExit",
    "SharedSpaces",
    "RecordDynamicDumpInfo",
    "AutoCreateSharedArchive",
)


def archive_options(extra: str) -> bool:
    """Whether ``extra`` (``KAFKA_OPTS``) sets class sharing itself (then
    ours would conflict with it, or be ignored)."""
    return any(name in o for o in shlex.split(extra) for name in _CLASS_SHARING)


class KafkaNode(_Child):
    """One combined broker and controller of a :class:`KafkaCluster`."""

    def __init__(self, cluster: KafkaCluster, node_id: int, port: int, controller_port: int):
        self.cluster = cluster
        self.node_id = node_id
        self.port = port
        self.controller_port = controller_port
        self.dir = cluster.data_dir / f"node-{node_id}"
        self.name = f"kafka node {node_id}"
        # the class-data archive its JVM writes at exit, and where it goes
        self._dumping: tuple[Path, Path] | None = None

    @property
    def log_dir(self) -> Path:
        return self.dir / "data"

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        c = self.cluster
        n = len(c.nodes)
        config = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(
                f"{x.node_id}@127.0.0.1:{x.controller_port}" for x in c.nodes
            ),
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "default.replication.factor": str(n),
            "min.insync.replicas": str(2 if n >= 3 else 1),
            "offsets.topic.replication.factor": str(n),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(n),
            "transaction.state.log.min.isr": str(2 if n >= 3 else 1),
            "transaction.state.log.num.partitions": "10",
            "num.partitions": "1",
            # a group's first member need not wait 3 s for others
            "group.initial.rebalance.delay.ms": "0",
            "unclean.leader.election.enable": "false",
            **c.extra_config,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in config.items()))

    def _java(self, main: str, *args: str, heap: str = "64m") -> list[str]:
        extra = os.environ.get("KAFKA_OPTS", "")
        return [
            self.cluster.java,
            f"-Xmx{heap}",
            *self._class_sharing(main, extra),
            *jvm_options(extra),
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.cluster.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.cluster.lib}/*",
            main,
            *args,
        ]

    def _class_sharing(self, main: str, extra: str) -> list[str]:
        """The JVM loads the broker's classes from the archive the first node
        to stop wrote (about 1.5 CPU-s less of its 4 to start, and 0.4 of
        the storage tool's 1.6); until there is one, a node writes one when
        it stops (``stop``). A missing, stale or damaged archive is no error:
        the JVM then loads the classes from the jars."""
        if archive_options(extra):
            return []
        archive = class_archive(self.cluster.java)
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        if main != "kafka.Kafka":
            return []
        dump = archive.with_name(f"{archive.name}.{uuid.uuid4().hex}.tmp")
        self._dumping = (dump, archive)
        return [f"-XX:ArchiveClassesAtExit={dump}"]

    def _format(self) -> None:
        if (self.log_dir / "meta.properties").exists():
            return
        result = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                # one argument: a base64url id can begin with "-", which
                # the tool's parser would take for an option (1 run in 32)
                f"--cluster-id={self.cluster.cluster_id}",
                "--config",
                str(self.properties),
                "--ignore-formatted",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedStackError(
                f"formatting {self.name}'s storage failed: {result.stdout}{result.stderr}"[-2000:]
            )

    def start(self) -> None:
        if self.running:
            return
        self._keep_archive(False)  # one a JVM that ended by itself may have left unfinished
        for port in (self.port, self.controller_port):
            if not _port_free(port):
                raise EmbeddedStackError(
                    f"port {port} is taken: is another `usertrail up` running? "
                    "Choose another with --kafka-port"
                )
        self._write_config()
        self._format()
        with open(self.dir / "kafka.log", "ab") as out:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties), heap=self.cluster.heap),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **OWNED_CHILD,
            )
        log.info("%s pid %d on 127.0.0.1:%d", self.name, self.proc.pid, self.port)

    def wait_listening(self, timeout: float = 120) -> None:
        """Until the node accepts clients: after its metadata caught up, which
        after a SIGKILL includes recovering every partition it holds."""
        assert self.proc is not None
        try:
            _wait_for_port(self.port, self.proc, self.name, timeout=timeout)
        except EmbeddedStackError as e:
            raise EmbeddedStackError(f"{e} (see {self.dir / 'kafka.log'})") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._stop(signal.SIGKILL, grace=10)
        self._keep_archive(False)

    def stop(self) -> None:
        """SIGTERM: a controlled shutdown that hands leadership over first."""
        if self.running:
            self.resume()  # a paused JVM would not see the SIGTERM
        proc = self.proc
        self._stop(signal.SIGTERM, grace=30)
        # a JVM exits 128 + 15 after its shutdown on SIGTERM, 0 if it stopped first
        self._keep_archive(proc is not None and proc.returncode in (0, 128 + signal.SIGTERM))

    def _keep_archive(self, whole: bool) -> None:
        """The class-data archive the stopped JVM wrote at its exit is
        installed if it shut down cleanly (0 or SIGTERM's 143); one cut
        short, or of a JVM that crashed, is removed."""
        dumping, self._dumping = self._dumping, None
        if dumping is None or not dumping[0].exists():
            return
        if whole:
            os.replace(*dumping)
        else:
            dumping[0].unlink(missing_ok=True)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def quorum_state(self) -> dict[str, object]:
        path = self.log_dir / "__cluster_metadata-0" / "quorum-state"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}


class KafkaCluster:
    """``brokers`` KRaft nodes on 127.0.0.1: node ``i`` (from 1) serves
    clients on ``port + i - 1`` and its controller on ``port + 100 + i - 1``.
    Data under ``data_dir`` (``node-<i>/``), kept across restarts."""

    name = "Apache Kafka"
    kind = "kafka"

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int,
        brokers: int = 1,
        heap: str = "1g",
        extra_config: dict[str, str] | None = None,
    ) -> None:
        if brokers < 1:
            raise EmbeddedStackError("a Kafka cluster needs at least one broker")
        self.data_dir = data_dir.resolve()
        self.port = port
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self.nodes = [
            KafkaNode(self, i, port + i - 1, port + 100 + i - 1) for i in range(1, brokers + 1)
        ]
        self.java = ""
        self.lib = Path()

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    @property
    def cluster_id(self) -> str:
        path = self.data_dir / "cluster.id"
        if not path.exists():
            raw = uuid.uuid4().bytes  # Kafka's own cluster ids: 16 random bytes, base64url
            path.write_text(base64.urlsafe_b64encode(raw).decode().rstrip("=") + "\n")
        return path.read_text().strip()

    def _check_layout(self) -> None:
        existing = sorted(p.name for p in self.data_dir.glob("node-*"))
        wanted = sorted(n.dir.name for n in self.nodes)
        if existing and existing != wanted:
            raise EmbeddedStackError(
                f"{self.data_dir} holds a Kafka cluster of {len(existing)} broker(s), not "
                f"{len(self.nodes)}: start it with --brokers {len(existing)}, or use another "
                "--data-dir"
            )

    def start(self, timeout: float = 90) -> None:
        self.java = java_binary()
        self.lib = jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_layout()
        (self.data_dir / "log4j2.properties").write_text(_LOG4J)
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_listening(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 90) -> None:
        """Until every running node is a registered broker the cluster answers
        metadata requests with."""
        deadline = time.monotonic() + timeout
        want = {n.node_id for n in self.nodes if n.running}
        seen: set[int] = set()
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise EmbeddedStackError(
                        f"{node.name} exited with code {node.proc.returncode} while starting "
                        f"(see {node.dir / 'kafka.log'})"
                    )
            try:
                seen = set(probe(self.bootstrap_servers, timeout=2).brokers)
            except BrokerUnavailableError:
                seen = set()
            if want <= seen:
                return
            time.sleep(0.2)
        raise EmbeddedStackError(
            f"Apache Kafka did not register brokers {sorted(want - seen)} within {timeout:.0f}s"
        )

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def active_controller(self) -> KafkaNode:
        """The KRaft quorum's leader, as the running nodes' quorum state says
        (the newest epoch wins)."""
        best: tuple[int, int] = (-1, -1)
        for node in self.nodes:
            if not node.running:
                continue
            state = node.quorum_state()
            epoch, leader = state.get("leaderEpoch"), state.get("leaderId")
            if isinstance(epoch, int) and isinstance(leader, int) and leader > 0:
                best = max(best, (epoch, leader))
        if best[1] < 0:
            raise EmbeddedStackError("no KRaft leader is known")
        return self.node(best[1])

    def __iter__(self) -> Iterator[KafkaNode]:
        return iter(self.nodes)

    def stop(self) -> None:
        """Controlled shutdown of every node at once (each hands over what it
        leads), SIGKILL for any that takes longer than its grace."""
        running = [n for n in self.nodes if n.running]
        for node in running:
            assert node.proc is not None
            node.resume()
            node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:  # one that exited by itself too: what it left is settled
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
