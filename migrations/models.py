"""SQLAlchemy models: the product's tables exactly as the seeds define them,
and the pipeline's own bookkeeping tables (``usertrail_*``).

Names, types, defaults, nullability, indexes and foreign keys follow the
seeds' SQL (kept verbatim in ``tests/fixtures/seeds.sql``), so the product's
Prisma app reads and writes these tables unchanged. Constraint names are
PostgreSQL's defaults for the seeds' unnamed constraints (``<table>_pkey``,
``<table>_<col>_fkey``, ``<table>_<col>_key``), which are also Prisma's.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import BYTEA, DOUBLE_PRECISION, JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NOW = sa.text("CURRENT_TIMESTAMP")


class Base(DeclarativeBase):
    metadata = sa.MetaData()


class User(Base):
    """The product's user table. usertrail creates this minimal form only
    where the product has none; it never alters an existing one."""

    __tablename__ = "User"
    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="User_pkey"),
        # The marker migration 0001 leaves on a "User" it created (and the
        # only kind it drops on downgrade).
        {"comment": "usertrail: minimal User table, created because the database had none"},
    )

    id: Mapped[str] = mapped_column(sa.Text)
    createdAt: Mapped[datetime] = mapped_column(
        TIMESTAMP(precision=3), nullable=False, server_default=NOW
    )


def _user_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["userId"], ["User.id"], name=f"{table}_userId_fkey", ondelete="CASCADE"
    )


class UserInteraction(Base):
    """Seed 000: one row per interaction event (``id`` = event id)."""

    __tablename__ = "UserInteraction"
    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="UserInteraction_pkey"),
        _user_fk("UserInteraction"),
        sa.Index("UserInteraction_userId_createdAt_idx", "userId", "createdAt"),
        sa.Index("UserInteraction_userId_service_idx", "userId", "service"),
        sa.Index("UserInteraction_userId_theme_idx", "userId", "theme"),
    )

    id: Mapped[str] = mapped_column(sa.Text)
    userId: Mapped[str] = mapped_column(sa.Text, nullable=False)
    createdAt: Mapped[datetime | None] = mapped_column(TIMESTAMP(), server_default=NOW)
    type: Mapped[str] = mapped_column(sa.Text, nullable=False)
    service: Mapped[str] = mapped_column(sa.Text, nullable=False)
    theme: Mapped[str | None] = mapped_column(sa.Text)
    rating: Mapped[int | None] = mapped_column(sa.Integer)
    metadata_: Mapped[dict[str, object] | None] = mapped_column("metadata", JSONB)


class UserPreferences(Base):
    """Seed 000: explicit preferences, one row per user."""

    __tablename__ = "UserPreferences"
    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="UserPreferences_pkey"),
        sa.UniqueConstraint("userId", name="UserPreferences_userId_key"),
        _user_fk("UserPreferences"),
    )

    id: Mapped[str] = mapped_column(sa.Text)
    userId: Mapped[str] = mapped_column(sa.Text, nullable=False)
    createdAt: Mapped[datetime | None] = mapped_column(TIMESTAMP(), server_default=NOW)
    updatedAt: Mapped[datetime | None] = mapped_column(TIMESTAMP())
    preferredLanguage: Mapped[str | None] = mapped_column(sa.Text, server_default=sa.text("'en'"))
    preferredThemes: Mapped[list[str] | None] = mapped_column(JSONB)
    preferredServices: Mapped[list[str] | None] = mapped_column(JSONB)
    notificationSettings: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    readingLength: Mapped[str | None] = mapped_column(sa.Text, server_default=sa.text("'medium'"))
    tonePreference: Mapped[str | None] = mapped_column(sa.Text, server_default=sa.text("'casual'"))


class UserVector(Base):
    """``user_vectors``: the affinity vector and (seed 002) the segments."""

    __tablename__ = "user_vectors"
    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="user_vectors_pkey"),
        sa.UniqueConstraint("userId", name="user_vectors_userId_key"),
        _user_fk("user_vectors"),
        sa.Index("user_vectors_primarySegment_idx", "primarySegment"),
    )

    id: Mapped[str] = mapped_column(sa.Text)
    userId: Mapped[str] = mapped_column(sa.Text, nullable=False)
    vector: Mapped[dict[str, float]] = mapped_column(
        JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    createdAt: Mapped[datetime] = mapped_column(
        TIMESTAMP(precision=3), nullable=False, server_default=NOW
    )
    updatedAt: Mapped[datetime] = mapped_column(TIMESTAMP(precision=3), nullable=False)
    # seed 002 (add_user_segments)
    segments: Mapped[list[dict[str, object]] | None] = mapped_column(JSONB)
    primarySegment: Mapped[str | None] = mapped_column(sa.Text)
    segmentConfidence: Mapped[float | None] = mapped_column(DOUBLE_PRECISION)
    lastSegmentUpdate: Mapped[datetime | None] = mapped_column(TIMESTAMP(precision=3))


# --- the pipeline's own tables ------------------------------------------------------
class ConsumerPosition(Base):
    """The next offset to read, per consumer, topic and partition; written in
    the same transaction as the rows it accounts for (docs/architecture.md, rule 2)."""

    __tablename__ = "usertrail_positions"
    __table_args__ = (
        sa.PrimaryKeyConstraint("consumer", "topic", "partition", name="usertrail_positions_pkey"),
    )

    consumer: Mapped[str] = mapped_column(sa.Text)
    topic: Mapped[str] = mapped_column(sa.Text)
    partition: Mapped[int] = mapped_column(sa.Integer)
    next_offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")
    )
    # the broker's id of the topic the position was read from (docs/log.md)
    topic_id: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)


class ArchivedRecords(Base):
    """Raw records of one partition, read in one batch, written by the sink
    with its positions; what ``usertrail up`` restores into a broker that
    lost them (docs/log.md). ``data``: usertrail.archive's encoding."""

    __tablename__ = "usertrail_archive"
    __table_args__ = (
        sa.PrimaryKeyConstraint(
            "topic", "partition", "first_offset", name="usertrail_archive_pkey"
        ),
    )

    topic: Mapped[str] = mapped_column(sa.Text)
    partition: Mapped[int] = mapped_column(sa.Integer)
    first_offset: Mapped[int] = mapped_column(sa.BigInteger)
    last_offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    records: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    data: Mapped[bytes] = mapped_column(BYTEA, nullable=False)


class DeadLetterTable(Base):
    """An event that could not be applied: its reason, error and original bytes."""

    __tablename__ = "usertrail_dead_letters"
    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="usertrail_dead_letters_pkey"),
        sa.UniqueConstraint(
            "topic", "partition", "offset", name="usertrail_dead_letters_topic_partition_offset_key"
        ),
        sa.Index("usertrail_dead_letters_reason_idx", "reason", "resolved_at"),
        sa.Index(
            "usertrail_dead_letters_unpublished_idx",
            "id",
            postgresql_where=sa.text("unpublished"),
        ),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(always=False))
    reason: Mapped[str] = mapped_column(sa.Text, nullable=False)
    error: Mapped[str] = mapped_column(sa.Text, nullable=False)
    topic: Mapped[str] = mapped_column(sa.Text, nullable=False)
    partition: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    key: Mapped[bytes | None] = mapped_column(BYTEA)
    value: Mapped[bytes | None] = mapped_column(BYTEA)
    event_id: Mapped[str | None] = mapped_column(sa.Text)
    user_id: Mapped[str | None] = mapped_column(sa.Text)
    received_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")
    )
    retries: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    resolved_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    # not on the dead-letter topic yet (sink/consumer.py, _publish_dead_letters)
    unpublished: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())


class InFlight(Base):
    """The offsets of a partition a sink is handling, written before it
    decodes them: what it was handling if it died (sink/consumer.py,
    ``Careful``)."""

    __tablename__ = "usertrail_in_flight"
    __table_args__ = (
        sa.PrimaryKeyConstraint("consumer", "topic", "partition", name="usertrail_in_flight_pkey"),
    )

    consumer: Mapped[str] = mapped_column(sa.Text)
    topic: Mapped[str] = mapped_column(sa.Text)
    partition: Mapped[int] = mapped_column(sa.Integer)
    first_offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    last_offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="1")


class SeenEvent(Base):
    """The id of an applied event no product row keeps: a preferences
    change, an onboarding, an erasure, an interaction an erasure deleted
    (sink/writer.py: a resend of any of them changes nothing)."""

    __tablename__ = "usertrail_seen_events"
    __table_args__ = (sa.PrimaryKeyConstraint("id", name="usertrail_seen_events_pkey"),)

    id: Mapped[str] = mapped_column(sa.Text)


class ApiKey(Base):
    """A key of the HTTP collector: the source its events get, the SHA-256 of
    its secret part, and when it was revoked (collector/keys.py)."""

    __tablename__ = "usertrail_api_keys"
    __table_args__ = (sa.PrimaryKeyConstraint("id", name="usertrail_api_keys_pkey"),)

    id: Mapped[str] = mapped_column(sa.Text)
    source: Mapped[str] = mapped_column(sa.Text, nullable=False)
    name: Mapped[str | None] = mapped_column(sa.Text)
    secret_sha256: Mapped[str] = mapped_column(sa.Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")
    )
    revoked_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))


# The analytics rollups (migrations 0009 and 0010, appended to by triggers, a row per key
# after a compaction; docs/analytics.md)
ROLLUPS = (
    sa.Table(
        "usertrail_rollup_services",
        Base.metadata,
        sa.Column("service", sa.Text, nullable=False),
        sa.Column("interactions", sa.BigInteger, nullable=False),
        sa.Column("ratings", sa.BigInteger, nullable=False),
        sa.Column("rating_sum", sa.BigInteger, nullable=False),
        sa.Column("users", sa.BigInteger, nullable=False),
    ),
    sa.Table(
        "usertrail_rollup_service_users",
        Base.metadata,
        sa.Column("service", sa.Text),
        sa.Column("userId", sa.Text),
        sa.PrimaryKeyConstraint("service", "userId", name="usertrail_rollup_service_users_pkey"),
    ),
    sa.Table(
        "usertrail_rollup_engagement",
        Base.metadata,
        sa.Column("bucket", TIMESTAMP(), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("interactions", sa.Integer, nullable=False),
        sa.Index("usertrail_rollup_engagement_bucket_idx", "bucket"),
    ),
    sa.Table(
        "usertrail_rollup_themes",
        Base.metadata,
        sa.Column("theme", sa.Text, nullable=False),
        sa.Column("interactions", sa.BigInteger, nullable=False),
        sa.Column("ratings", sa.BigInteger, nullable=False),
        sa.Column("rating_sum", sa.BigInteger, nullable=False),
    ),
    sa.Table(
        "usertrail_rollup_segments",
        Base.metadata,
        sa.Column("segment", sa.Text),
        sa.Column("users", sa.BigInteger, nullable=False),
        sa.Column("confidences", sa.BigInteger, nullable=False),
        sa.Column("confidence_sum", sa.Numeric, nullable=False),
    ),
)


PRODUCT_TABLES = ("User", "UserInteraction", "UserPreferences", "user_vectors")
PIPELINE_TABLES = (
    "usertrail_positions",
    "usertrail_dead_letters",
    "usertrail_archive",
    "usertrail_in_flight",
    "usertrail_seen_events",
    "usertrail_api_keys",
    *(t.name for t in ROLLUPS),
)
ROLLUP_TABLES = tuple(t.name for t in ROLLUPS)
