"""Settings: one object per process, flag > environment > default.

Environment variables are ``USERTRAIL_<NAME>``; the broker and database also
answer to the conventional ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL``.
Leaving both unset means the embedded stack that ``usertrail up`` runs.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_HOST = "127.0.0.1"
STREAM_TABLE = "profiles"
# How old a client's view of the cluster may grow (aiokafka's default is five
# minutes). aiokafka refreshes it after most leader errors, but not when it
# looks up where to start reading: after a failover, a sink or worker asked
# the old leader for a partition's offsets every 100 ms until the periodic
# refresh, and read nothing from it meanwhile (docs/brokers.md, "Stale
# leader"). One metadata request per client every few seconds bounds that.
METADATA_MAX_AGE_MS = 5000
"""The stream's faust table; its changelog is ``<stream_app_id>-profiles-changelog``."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="USERTRAIL_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- broker -----------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "kafka_bootstrap_servers",
            "USERTRAIL_KAFKA_BOOTSTRAP_SERVERS",
            "KAFKA_BOOTSTRAP_SERVERS",
        ),
        description="host:port[,host:port]; unset = the embedded broker",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None
    ) = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_client_id: str = "usertrail"

    # --- database ---------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "USERTRAIL_DATABASE_URL", "DATABASE_URL"),
        description="postgresql://...; unset = the embedded PostgreSQL",
    )

    # --- topics -----------------------------------------------------------
    events_topic: str = "usertrail.events"
    profiles_topic: str = "usertrail.profiles"
    dead_letter_topic: str = "usertrail.deadletter"
    events_partitions: int = Field(default=8, ge=1, le=10_000)
    stream_app_id: str = "usertrail-stream"  # the faust app: group id, changelog prefix
    stream_web_port: int = Field(default=6066, ge=1, le=65535)  # GET /profiles/{userId}
    # The address the worker's web server listens on, and the one other
    # workers reach it at (a host, host:port or URL; default: the web host,
    # or this machine's name when listening on every address). faust
    # forwards a profile lookup to the worker that owns the user by it.
    stream_web_host: str = "127.0.0.1"
    stream_web_advertise: str | None = None
    # the sink's metrics and health (`GET /metrics`, `GET /health`; sink/web.py);
    # no port: not served
    sink_web_host: str = "127.0.0.1"
    sink_web_port: int | None = Field(default=None, ge=1, le=65535)
    # the HTTP collector (`usertrail collector`, collector/app.py): where it
    # listens, the browser origins it answers (comma-separated; "*" any), and
    # its limits per request
    collector_host: str = "127.0.0.1"
    collector_port: int = Field(default=8787, ge=1, le=65535)
    collector_cors_origins: str = ""
    collector_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    collector_max_events: int = Field(default=1000, ge=1)
    # events each source's client holds unacknowledged; a request whose valid
    # events do not fit is answered 429 (Retry-After)
    collector_buffer_events: int = Field(default=20_000, ge=1)
    # the analytics (`usertrail analytics`, `usertrail dashboard`; analytics/):
    # the product's time zone, whose days the engagement report counts in (an
    # IANA name), and where the dashboard listens
    analytics_timezone: str = "UTC"
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8788, ge=1, le=65535)
    # where a stream worker keeps its table: "rocksdb" (on disk under the data
    # directory, recovered from there plus the changelog's tail: stream/store.py),
    # "memory" (re-read from the changelog at every start), or "auto": rocksdb on
    # Apache Kafka, memory on tansu, whose log `up` restores into new topics
    # (a local store would hold another log's offsets) and whose changelog is
    # small and in memory anyway
    stream_store: Literal["auto", "memory", "rocksdb"] = "auto"
    # decode and fold in a helper process, on another core than the worker's
    # fetching and writes; false: in the worker's process (one core, or to profile the fold)
    stream_fold_process: bool = True
    # events folded per batch at most (a changed user's state is written once
    # per batch); a batch is what waits when the folder is free, nothing
    # waits to fill one (stream/pipeline.py)
    stream_batch_max: int = Field(default=4000, ge=1)
    # replicas of every topic we create; unset: as many as the cluster has
    # brokers, at most 3
    replication_factor: int | None = Field(default=None, ge=1)
    # segment rules (TOML) of the stream, replay and verify; unset: the shipped
    # stream/rules.toml. The workers `usertrail up` runs read it too.
    rules: Path | None = None

    # where the SDK keeps what the broker did not acknowledge (one file per
    # source); unset: the user's data directory (producers/spool.py)
    spool_dir: Path | None = None

    # --- embedded stack ---------------------------------------------------
    data_dir: Path = Path(".usertrail")
    embedded_kafka_port: int = Field(default=19092, ge=1, le=65535)
    # the broker `up` starts when no bootstrap servers are given: tansu
    # (memory only, starts in a second) or Apache Kafka (Java 17; its jars
    # fetched from Maven Central once), 1 or 3 nodes
    embedded_broker: Literal["tansu", "kafka"] = "tansu"
    embedded_kafka_brokers: int = 1

    @field_validator("embedded_kafka_brokers")
    @classmethod
    def _one_or_three(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("Apache Kafka runs 1 node or 3 (a quorum of two is none)")
        return value

    embedded_postgres_port: int = Field(default=55432, ge=1, le=65535)
    embedded_database: str = "usertrail"

    # Which broker is it? "auto" asks the broker (usertrail.kafka.probe); the
    # workarounds of docs/brokers.md apply only to tansu. Set it only where
    # the probe cannot see (TLS or SASL listeners).
    broker: Literal["auto", "tansu", "kafka"] = "auto"
    # Keep every record the sink reads in the database (usertrail_archive,
    # docs/log.md), from which `usertrail up` restores a broker that lost
    # its log. "auto": on tansu only (it keeps its log in memory); "on" also
    # keeps a copy of a production log beyond its retention.
    archive: Literal["auto", "on", "off"] = "auto"

    # Consumer-group timing. Unset: Kafka's defaults on a real cluster; on
    # the embedded broker, short ones, because tansu holds the first
    # JoinGroup for max(1 s, session/2) (docs/brokers.md: 32 s to a first
    # event with faust's defaults, 3.5 s with these).
    group_session_timeout_ms: int | None = Field(default=None, ge=1000)
    group_heartbeat_interval_ms: int | None = Field(default=None, ge=100)
    # Static group membership (KIP-345): a member that comes back under the
    # same name within the session timeout gets its partitions back with no
    # rebalance of the group (docs/brokers.md, "Rebalance storms"). Unique per
    # worker process of a group; `usertrail up` names its own workers.
    # Apache Kafka only: ignored on tansu, whose groups wedge with it.
    group_instance_id: str | None = Field(default=None, min_length=1, max_length=249)

    # A sink with no partitions, or behind and reading nothing, for this long
    # (waiting for the database aside) exits with code 6 to be restarted.
    stall_seconds: float = Field(default=120.0, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # text: a line of prose per record; json: one JSON object per line
    log_format: Literal["text", "json"] = "text"

    # --- derived ------------------------------------------------------------
    @property
    def changelog_topic(self) -> str:
        """The stream table's changelog (faust's name for it)."""
        return f"{self.stream_app_id}-{STREAM_TABLE}-changelog"

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def broker_kind(self) -> Literal["tansu", "kafka"]:
        """What the broker is: the setting, else what the broker answers
        (asked once per process and address)."""
        if self.broker != "auto":
            return self.broker
        if self.kafka_security_protocol != "PLAINTEXT":
            return "kafka"  # the embedded broker has no TLS or SASL
        from usertrail.kafka import probe_cached

        return probe_cached(self.bootstrap_servers).kind

    @property
    def is_tansu(self) -> bool:
        return self.broker_kind == "tansu"

    @property
    def archiving(self) -> bool:
        return self.archive == "on" or (self.archive == "auto" and self.is_tansu)

    @property
    def embedded_database_url(self) -> str:
        return (
            f"postgresql://postgres@{EMBEDDED_HOST}:{self.embedded_postgres_port}"
            f"/{self.embedded_database}"
        )

    @property
    def embedded_db(self) -> bool:
        return self.database_url is None

    @property
    def bootstrap_servers(self) -> str:
        if self.kafka_bootstrap_servers is not None:
            return self.kafka_bootstrap_servers
        brokers = self.embedded_kafka_brokers if self.embedded_broker == "kafka" else 1
        return ",".join(f"{EMBEDDED_HOST}:{self.embedded_kafka_port + i}" for i in range(brokers))

    def database_dsn(self) -> str:
        """The libpq URL (secret inside: never log it)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return self.embedded_database_url

    def sqlalchemy_url(self) -> str:
        dsn = self.database_dsn()
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if dsn.startswith(prefix):
                return "postgresql+psycopg://" + dsn[len(prefix) :]
        return dsn

    def replicas(self) -> int:
        """Replication factor of the topics we create: the setting, else as
        many as the cluster has brokers, at most 3 (behind TLS or SASL, where
        the brokers are not counted: 3)."""
        if self.replication_factor is not None:
            return self.replication_factor
        if self.kafka_security_protocol != "PLAINTEXT":
            return 3
        from usertrail.kafka import probe_cached

        return max(1, min(3, len(probe_cached(self.bootstrap_servers).brokers)))

    def group_options(self) -> dict[str, Any]:
        """Consumer-group timing for aiokafka consumers."""
        fast = self.is_tansu
        session = self.group_session_timeout_ms or (2000 if fast else 10_000)
        heartbeat = self.group_heartbeat_interval_ms or (200 if fast else 3000)
        options: dict[str, Any] = {
            "session_timeout_ms": session,
            "heartbeat_interval_ms": heartbeat,
            "rebalance_timeout_ms": max(session, 2000 if fast else 60_000),
        }
        if self.group_instance_id is not None and not fast:
            # not on tansu: its groups wedged with static members in
            # `bench/rebalance_storm.py` (docs/brokers.md, "Rebalance storms")
            options["group_instance_id"] = self.group_instance_id
        return options

    @property
    def fetch_wait_ms(self) -> int:
        """How long a consumer's fetch may wait on the broker. tansu answers
        only when the wait is over, records or not (docs/brokers.md,
        "Fetches wait their whole wait"): there every wait is latency, so it
        is short. Apache Kafka answers once ``fetch_min_bytes`` are there or
        the wait is over, whichever comes first."""
        return 50 if self.is_tansu else 30

    @property
    def fetch_min_bytes(self) -> int:
        """What a fetch waits for on Apache Kafka (up to ``fetch_wait_ms``).
        Answered at its first record, a fetch at 1,000 events/s carried a
        produce request's few records, and each consumer paid a fetch, and a
        hand-over, for every one, on two cores that were full. With 64 KiB
        or 30 ms, `./dev bench scale --part freshness --rounds 3 --broker
        kafka` (2026-12-03, alternated twice with the code before) gave the
        profiles p99 253 and 320 ms against 941 and 779, the rows 180 and
        216 against 347 and 341, and the sink 29-32% of a core against
        36-39. A backlog is answered at once, as before. tansu ignores it
        (it answers at the wait's end)."""
        return 1 if self.is_tansu else 64 * 1024

    def stream_store_kind(self) -> Literal["memory", "rocksdb"]:
        if self.stream_store != "auto":
            return self.stream_store
        return "memory" if self.is_tansu else "rocksdb"

    def web_url(self, port: int) -> str:
        """The URL other workers reach this worker's web server at."""
        advertised = self.stream_web_advertise
        if advertised is None:
            host = self.stream_web_host
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostname()
            advertised = f"{host}:{port}"
        if "://" not in advertised:
            advertised = f"http://{advertised}"
        parsed = urlsplit(advertised)
        if parsed.port is None:
            advertised = f"{parsed.scheme}://{parsed.hostname}:{port}"
        return advertised.rstrip("/")

    def kafka_options(self) -> dict[str, Any]:
        """Connection keyword arguments for any aiokafka client."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
            "metadata_max_age_ms": METADATA_MAX_AGE_MS,
        }
        if self.kafka_sasl_mechanism is not None:
            opts["sasl_mechanism"] = self.kafka_sasl_mechanism
            if self.kafka_sasl_username is not None:
                opts["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                opts["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
            if self.kafka_ssl_certfile is not None:
                ctx.load_cert_chain(
                    str(self.kafka_ssl_certfile),
                    str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                )
            opts["ssl_context"] = ctx
        return opts
