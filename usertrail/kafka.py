"""What the pipeline asks of any Kafka: which broker it is, and stopping
aiokafka clients on a broker that may not answer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import struct
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import ConnectionGroup
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)

from usertrail.errors import BrokerUnavailableError, UsertrailError

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
    def kind(self) -> Literal["tansu", "kafka"]:
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


# --- record headers as one value (the log archive) ---------------------------------
def encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes | None:
    """Headers as one byte string, as in a Kafka record: per header the key's
    length (int16) and bytes, the value's length (int32, -1: null) and bytes."""
    if not headers:
        return None
    out = bytearray()
    for key, value in headers:
        raw = key.encode()
        out += struct.pack(">h", len(raw)) + raw
        out += struct.pack(">i", -1 if value is None else len(value)) + (value or b"")
    return bytes(out)


def decode_headers(data: bytes | None) -> list[tuple[str, bytes | None]]:
    if not data:
        return []
    headers, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from(">h", data, at)
        key = data[at + 2 : at + 2 + n].decode()
        at += 2 + n
        (m,) = struct.unpack_from(">i", data, at)
        at += 4
        headers.append((key, None if m < 0 else data[at : at + m]))
        at += max(m, 0)
    return headers


_probed: dict[str, BrokerInfo] = {}


def probe_cached(bootstrap_servers: str) -> BrokerInfo:
    """:func:`probe`, once per process and address (what a broker is does
    not change while a process runs)."""
    if bootstrap_servers not in _probed:
        _probed[bootstrap_servers] = probe(bootstrap_servers)
    return _probed[bootstrap_servers]


# --- which log is this? ---------------------------------------------------------------
# A topic's id (Metadata v10+, a UUID the broker gives a topic when it creates
# it) names one log: a recreated topic, a wiped or restarted tansu, another
# cluster all answer another id for the same name. aiokafka's Metadata
# request stops at v5, so v12 (Kafka 3.1+, tansu 0.6) is declared here with
# aiokafka's own protocol types and sent over the client's connection (TLS
# and SASL included); v10 (Kafka 2.8) is the oldest that carries the id.
from io import BytesIO  # noqa: E402
from uuid import UUID  # noqa: E402

from aiokafka.protocol.api import Request, RequestStruct, Response  # noqa: E402
from aiokafka.protocol.types import (  # noqa: E402
    AbstractType,
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)


class _Uuid(AbstractType[bytes]):  # type: ignore[misc]  # aiokafka: untyped
    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        return data.read(16)


_PARTITION = (
    ("error_code", Int16),
    ("partition_index", Int32),
    ("leader_id", Int32),
    ("leader_epoch", Int32),
    ("replica_nodes", CompactArray(Int32)),
    ("isr_nodes", CompactArray(Int32)),
    ("offline_replicas", CompactArray(Int32)),
    ("tags", TaggedFields),
)
_BROKER = (
    ("node_id", Int32),
    ("host", CompactString("utf-8")),
    ("port", Int32),
    ("rack", CompactString("utf-8")),
    ("tags", TaggedFields),
)
_REQUEST_TOPIC = (("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields))


def _response(version: int, cluster_ops: bool) -> type[Response]:
    topic = [
        ("error_code", Int16),
        ("name", CompactString("utf-8")),
        ("topic_id", _Uuid),
        ("is_internal", Boolean),
        ("partitions", CompactArray(*_PARTITION)),
        ("topic_authorized_operations", Int32),
        ("tags", TaggedFields),
    ]
    fields = [
        ("throttle_time_ms", Int32),
        ("brokers", CompactArray(*_BROKER)),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        ("topics", CompactArray(*topic)),
    ]
    if cluster_ops:
        fields.append(("cluster_authorized_operations", Int32))
    fields.append(("tags", TaggedFields))
    return type(
        f"MetadataTopicIdsResponse_v{version}",
        (Response,),
        {"API_KEY": _METADATA, "API_VERSION": version, "SCHEMA": Schema(*fields)},
    )


class _MetadataV10(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = _METADATA
    API_VERSION = 10
    RESPONSE_TYPE = _response(10, cluster_ops=True)
    SCHEMA = Schema(
        ("topics", CompactArray(*_REQUEST_TOPIC)),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _MetadataV12(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = _METADATA
    API_VERSION = 12
    RESPONSE_TYPE = _response(12, cluster_ops=False)
    SCHEMA = Schema(
        ("topics", CompactArray(*_REQUEST_TOPIC)),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIdsRequest(Request[_MetadataV10 | _MetadataV12]):  # type: ignore[misc]
    API_KEY = _METADATA

    def __init__(self, topics: list[str]) -> None:
        self.topics: list[tuple[bytes, str, dict[str, Any]]] = [
            (bytes(16), name, {}) for name in topics
        ]

    def build(self, request_struct_class: type[_MetadataV10 | _MetadataV12]) -> Any:
        if request_struct_class is _MetadataV10:
            return _MetadataV10(self.topics, False, False, False, {})
        return _MetadataV12(self.topics, False, False, {})


_NO_TOPIC_ID = UUID(int=0)


@dataclass(frozen=True)
class LogIdentity:
    cluster_id: str | None
    topic_ids: dict[str, UUID | None]  # None: no such topic (or no id offered)


async def log_identity(client: Any, topics: list[str]) -> LogIdentity:
    """The cluster id and each topic's id, asked of the broker through an
    aiokafka client (``AIOKafkaConsumer._client`` or a producer's ``client``).
    A broker too old for topic ids answers None for each: then nothing here
    can tell one log from another, and callers fall back to offsets alone.
    Never creates a topic."""
    node = client.get_random_node()
    if node is None:
        await client.force_metadata_update()
        node = client.get_random_node()
    if node is None:
        raise KafkaConnectionError("no broker to ask for topic ids")
    try:
        response = await client.send(node, _TopicIdsRequest(topics))
    except NotImplementedError:  # the broker's Metadata stops below v10
        return LogIdentity(None, dict.fromkeys(topics))
    ids: dict[str, UUID | None] = dict.fromkeys(topics)
    for error, name, topic_id, *_ in response.topics:
        if error == 0 and name in ids:
            found = UUID(bytes=topic_id)
            ids[name] = None if found == _NO_TOPIC_ID else found
    return LogIdentity(response.cluster_id, ids)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """A topic's partitions from metadata fetched now; [] if it does not
    exist. (A consumer's own metadata shrinks to the topics assigned to it,
    refreshed in the background, so asking it is a race.)"""
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]


async def high_waters(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[int, int]:
    """Each partition's high-water mark, as fetch responses carry it (tansu's
    end offsets are wrong after multi-record batches, docs/brokers.md)."""
    for tp in tps:
        consumer.seek(tp, 0)
    ends: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(ends) < len(tps):
        await consumer.getmany(*tps, timeout_ms=200, max_records=1)
        for tp in tps:
            high = consumer.highwater(tp)
            if high is not None:
                ends[tp.partition] = high
        if time.monotonic() > deadline:
            missing = sorted(tp.partition for tp in tps if tp.partition not in ends)
            raise UsertrailError(f"no high-water mark for partitions {missing}")
    return ends


_NEVER_CREATING = False
# Set by ``no_topic_creation`` for the clients started inside it: the tasks
# an aiokafka client starts (its metadata refresh among them) inherit the
# context they were made in.
_NO_CREATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "usertrail_no_topic_creation", default=False
)
_INSTALLED = False


def never_create_topics() -> None:
    """Every metadata request of this process's aiokafka clients (faust's
    too) asks the broker not to create the topics it names. aiokafka asks
    for creation on every request (``allow_auto_topic_creation`` defaults to
    True), so on a broker that allows it (tansu always; Apache Kafka with
    ``auto.create.topics.enable``) a worker asking for a topic that is
    missing made it, with the broker's default partition count. That
    happened under running workers whose broker came back empty: their next
    request made ``usertrail.profiles`` with 8 partitions before `up
    --only-setup` made the events with 4, and the pipeline's partitioning
    was broken for good. Topics are made only by ``ensure_topics`` (and
    faust's CreateTopics for what it declares); a topic that is missing
    stays missing, which the workers report. Installed once per process by
    the pipeline's commands and workers; the SDK, in an app's process, uses
    ``no_topic_creation`` for its own clients alone."""
    global _NEVER_CREATING
    _NEVER_CREATING = True
    _install_metadata_request()


@contextlib.contextmanager
def no_topic_creation() -> Iterator[None]:
    """``never_create_topics`` for the aiokafka clients started inside this
    block only (``await producer.start()``): an app's own clients keep
    asking for creation as aiokafka does."""
    try:
        _install_metadata_request()
    except RuntimeError as exc:  # an aiokafka we do not know: in an app, say it and go on
        log.warning("%s; the SDK's producer may ask the broker to create its topic", exc)
    token = _NO_CREATION.set(True)
    try:
        yield
    finally:
        _NO_CREATION.reset(token)


def _install_metadata_request() -> None:
    """aiokafka's MetadataRequest, asking not to create the topics it names
    in a process that said so (``never_create_topics``) or a context that
    did (``no_topic_creation``), and as aiokafka's everywhere else."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    import aiokafka.admin.client
    import aiokafka.client
    from aiokafka.protocol import metadata

    class _MetadataRequest(metadata.MetadataRequest):  # type: ignore[misc]
        def __init__(
            self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None
        ) -> None:
            if _NEVER_CREATING or _NO_CREATION.get():
                allow_auto_topic_creation = bool(allow_auto_topic_creation)
            super().__init__(topics, allow_auto_topic_creation)

    for module in (aiokafka.client, aiokafka.admin.client):
        if getattr(module, "MetadataRequest", None) is not metadata.MetadataRequest:
            raise RuntimeError(
                f"{module.__name__} no longer sends aiokafka.protocol.metadata.MetadataRequest: "
                "usertrail.kafka.never_create_topics needs a look at this aiokafka version"
            )
        module.MetadataRequest = _MetadataRequest
    # aiokafka says a subscribed topic is missing at every metadata retry
    # (10 a second): once a minute a topic is enough
    logging.getLogger("aiokafka.cluster").addFilter(_MissingTopicSaidOnce(60.0))


_PRODUCE = 0


async def _confirm(conn: Any, wanted: set[tuple[str, int]]) -> None:
    """Ask the broker at the other end of ``conn`` for the topics of
    ``wanted`` (topic, partition) pairs; raise what aiokafka's producer
    retries (a KafkaError) unless it has every one of them. Asked on the
    connection itself, so aiokafka's own handling of a request that times
    out is done here: the connection is closed."""
    from aiokafka.conn import CloseReason
    from aiokafka.protocol.metadata import MetadataRequest

    topics = sorted({topic for topic, _ in wanted})
    try:
        answer = await conn.send(MetadataRequest(topics, False))
    except KafkaError:
        raise
    except TimeoutError:
        conn.close(reason=CloseReason.CONNECTION_TIMEOUT)
        raise RequestTimedOutError("no answer to the check of the topics") from None
    except Exception as exc:  # noqa: BLE001  # the sender only takes KafkaErrors
        raise KafkaConnectionError(f"checking the topics failed: {exc!r}") from exc
    present: set[tuple[str, int]] = set()
    for error, name, *rest in answer.topics:
        if error == 0:
            parts = next((x for x in rest if isinstance(x, list)), [])
            present.update((name, int(part[1])) for part in parts)
    missing = sorted(wanted - present)
    if missing:
        raise UnknownTopicOrPartitionError(
            "the broker has no "
            + ", ".join(f"{topic}[{partition}]" for topic, partition in missing)
            + " (back empty after a restart?); nothing is sent there until it is made"
        )


def confirm_topics_before_producing(client: Any) -> None:
    """A produce request goes over a connection only once the broker at its
    other end said, on that connection, that it has the request's topics
    and partitions.

    The embedded broker (tansu) acknowledges a produce to a topic it does
    not have and keeps nothing of it (docs/brokers.md 13). Restarted empty
    at the same address, it took everything a running producer sent before
    `up` made its topics: acknowledged, and lost. aiokafka sends over a new
    connection by itself (again after a broken one, within a retry), so the
    question is asked where it connects: once per connection and topic,
    nothing in between. A partition the broker lacks fails the request as
    UnknownTopicOrPartition, which aiokafka retries after refreshing its
    metadata, until the batch's delivery timeout. Wraps the client's
    ``send`` (aiokafka internals: its ``_get_conn`` and the produce
    request's ``_topics``; tests/producers/test_client.py fails without them)."""
    send = client.send
    confirmed: weakref.WeakKeyDictionary[Any, set[tuple[str, int]]] = weakref.WeakKeyDictionary()

    async def confirming_send(node_id: int, request: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group", ConnectionGroup.DEFAULT)
        if getattr(request, "API_KEY", None) != _PRODUCE:
            return await send(node_id, request, **kwargs)
        conn = await client._get_conn(node_id, group=group)
        if conn is not None:
            wanted = {(topic, p) for topic, parts in request._topics for p, _ in parts}
            seen = confirmed.setdefault(conn, set())
            if not wanted <= seen:
                await _confirm(conn, wanted - seen)
                seen.update(wanted)
            if client._conns.get((node_id, group)) is not conn or not conn.connected():
                # closed while asked: the produce would go over a new one, unasked
                raise KafkaConnectionError(f"the connection to node {node_id} closed")
        return await send(node_id, request, **kwargs)

    client.send = confirming_send


class _MissingTopicSaidOnce(logging.Filter):
    """aiokafka.cluster's "Topic %s not found in cluster metadata", as a
    warning once per topic and ``every`` seconds, naming what makes it."""

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every
        self.said: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Topic %s not found in cluster metadata" or not record.args:
            return True
        topic = str(record.args[0] if isinstance(record.args, tuple) else record.args)
        now = time.monotonic()
        if now - self.said.get(topic, -self.every) < self.every:
            return False
        self.said[topic] = now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = (
            "topic %s does not exist on the broker; waiting for it (topics are made by "
            "`usertrail up --only-setup` or compose's init, never by asking for them)"
        )
        return True


_ADOPTING = False


def adopt_stale_group_leaders() -> None:
    """Work around tansu's stale group leader (docs/brokers.md, "Stale group
    leader"): a member that leaves while its group is rebalancing is removed,
    but if it was the leader, tansu keeps its id as leader; every later
    JoinGroup names that id, nobody may sync, and the group never forms
    again until the broker restarts. A follower told of a leader that
    DescribeGroups does not list as a member leaves with its own id and
    joins again under the leader's: tansu then answers it as the leader,
    with every member, and the group forms.

    Installed (once per process, for aiokafka's group coordinator, so faust's
    consumer too) only where the broker answers as tansu; on Apache Kafka
    the leader is always a member and nothing changes."""
    global _ADOPTING
    if _ADOPTING:
        return
    _ADOPTING = True
    from aiokafka.consumer import group_coordinator as gc
    from aiokafka.protocol.admin import DescribeGroupsRequest
    from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

    send, follow = gc.GroupCoordinator._send_req, gc.CoordinatorGroupRebalance._on_join_follower

    async def _send_req(self: Any, request: Any) -> Any:
        response = await send(self, request)
        if isinstance(request, JoinGroupRequest) and response.error_code == 0:
            self._usertrail_joined = response
        return response

    async def _on_join_follower(self: Any) -> Any:
        coordinator = self._coordinator
        joined = getattr(coordinator, "_usertrail_joined", None)
        leader = joined.leader_id if joined is not None else None
        if leader and leader != coordinator.member_id:
            try:
                described = await coordinator._send_req(DescribeGroupsRequest([self.group_id]))
                members = {m[0] for m in described.groups[0][5]}
            except (KafkaError, IndexError):
                members = {leader}  # not known: follow as usual
            if leader not in members:
                log.warning(
                    "group %s: its leader %s is not one of its members %s (tansu's stale "
                    "leader); joining again in its place",
                    self.group_id,
                    leader,
                    sorted(members),
                )
                with contextlib.suppress(KafkaError):
                    await coordinator._send_req(
                        LeaveGroupRequest(self.group_id, coordinator.member_id)
                    )
                coordinator.member_id = leader
                return None  # aiokafka joins again at once, now as the leader
        return await follow(self)

    gc.GroupCoordinator._send_req = _send_req
    gc.CoordinatorGroupRebalance._on_join_follower = _on_join_follower
