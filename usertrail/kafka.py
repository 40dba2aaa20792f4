"""What the pipeline asks of any Kafka: which broker it is, and stopping
aiokafka clients on a broker that may not answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from usertrail.errors import BrokerUnavailableError

log = logging.getLogger("usertrail")


async def stop_within(
    client: AIOKafkaProducer | AIOKafkaConsumer, seconds: float, what: str = "kafka client"
) -> None:
    """``client.stop()``, bounded: aiokafka's stop can hang on a broker that
    went away (docs/brokers.md). One that did not stop within ``seconds`` has
    its connections closed directly; left open, each held its socket until
    garbage collection found it, with a ResourceWarning then."""
    try:
        await asyncio.wait_for(client.stop(), seconds)
        return
    except (TimeoutError, KafkaError) as exc:
        log.warning("%s did not stop cleanly: %r", what, exc)
    connections = client.client if isinstance(client, AIOKafkaProducer) else client._client
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        await asyncio.wait_for(connections.close(), timeout=5)


# --- what broker is this? -------------------------------------------------------------
# Asked on the wire, with two requests every Kafka-protocol broker answers:
# ApiVersions v0 (the APIs it offers) and Metadata v4 (its brokers and cluster
# id). Plain sockets, so that sync code (``up``, fixtures) can ask without an
# event loop and no aiokafka internals are needed.
_API_VERSIONS = 18
_METADATA = 3
_CREATE_PARTITIONS = 37
_ALTER_CONFIGS = 33
TANSU_CLUSTER_ID = "tansu_cluster"


@dataclass(frozen=True)
class BrokerInfo:
    cluster_id: str | None
    brokers: dict[int, str]  # node id -> host:port
    api_keys: frozenset[int]

    @property
    def is_tansu(self) -> bool:
        """The embedded broker (tansu), which needs the workarounds in
        docs/brokers.md: it names its cluster ``tansu_cluster`` and offers no
        CreatePartitions or AlterConfigs, which every Apache Kafka since 1.0
        does. A broker that is unsure of stays on the safe side of neither
        test: it gets Kafka's behaviour only when it offers Kafka's APIs."""
        if self.cluster_id == TANSU_CLUSTER_ID:
            return True
        return not {_CREATE_PARTITIONS, _ALTER_CONFIGS} <= self.api_keys

    @property
    def kind(self) -> str:
        return "tansu" if self.is_tansu else "kafka"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        raw = self.data[self.at : self.at + n]
        self.at += n
        return raw.decode()


def _call(sock: socket.socket, api_key: int, version: int, body: bytes, corr: int) -> _Reader:
    client = b"usertrail-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client)) + client
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)

    def exactly(n: int) -> bytes:
        chunks = b""
        while len(chunks) < n:
            chunk = sock.recv(n - len(chunks))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            chunks += chunk
        return chunks

    (size,) = struct.unpack(">i", exactly(4))
    reader = _Reader(exactly(size))
    if reader.take(">i") != corr:
        raise ConnectionError("the broker answered another request")
    return reader


def _probe_one(host: str, port: int, timeout: float) -> BrokerInfo:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        r = _call(sock, _API_VERSIONS, 0, b"", 1)
        r.take(">h")  # error code
        keys = set()
        for _ in range(r.take(">i")):
            keys.add(r.take(">h"))
            r.take(">h")
            r.take(">h")
        # Metadata v4: no topics, no auto-creation
        r = _call(sock, _METADATA, 4, struct.pack(">ib", 0, 0), 2)
        r.take(">i")  # throttle
        brokers = {}
        for _ in range(r.take(">i")):
            node = r.take(">i")
            node_host = r.string()
            node_port = r.take(">i")
            r.string()  # rack
            brokers[node] = f"{node_host}:{node_port}"
        cluster_id = r.string()
    return BrokerInfo(cluster_id, brokers, frozenset(keys))


def probe(bootstrap_servers: str, timeout: float = 5.0) -> BrokerInfo:
    """Ask the first bootstrap server that answers what it is (plaintext
    listeners only: behind TLS or SASL, say which broker it is with
    ``USERTRAIL_BROKER``)."""
    errors = []
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            return _probe_one(host.strip("[]") or "127.0.0.1", int(port), timeout)
        except (OSError, ValueError, struct.error) as exc:
            errors.append(f"{address.strip()}: {exc}")
    raise BrokerUnavailableError(f"cannot reach Kafka at {bootstrap_servers}: {'; '.join(errors)}")


_probed: dict[str, BrokerInfo] = {}


def probe_cached(bootstrap_servers: str) -> BrokerInfo:
    """:func:`probe`, once per process and address (what a broker is does
    not change while a process runs)."""
    if bootstrap_servers not in _probed:
        _probed[bootstrap_servers] = probe(bootstrap_servers)
    return _probed[bootstrap_servers]
