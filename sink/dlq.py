"""Dead letters: list them, and re-drive them through the sink's writer.

A re-driven event that fails again (the user still unknown, the data still
bad) stays a dead letter with its retry count raised; one that applies is
marked resolved. Re-driving never moves the sink's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from usertrail.producers.events import stamped
from usertrail.sink.plan import Record
from usertrail.sink.writer import UnknownUsers, Writer

from usertrail import deadletters
from usertrail.settings import Settings


@dataclass(frozen=True)
class StoredDeadLetter:
    id: int
    reason: str
    error: str
    topic: str
    partition: int
    offset: int
    event_id: str | None
    user_id: str | None
    received_at: datetime
    retries: int
    resolved_at: datetime | None
    key: bytes | None
    value: bytes | None
    unpublished: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "error": self.error,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "eventId": self.event_id,
            "userId": self.user_id,
            "receivedAt": self.received_at.isoformat(),
            "retries": self.retries,
            "resolvedAt": self.resolved_at.isoformat() if self.resolved_at else None,
            "value": self.value.decode(errors="replace")[:2000] if self.value else None,
        }


def list_dead_letters(
    settings: Settings,
    *,
    reason: str | None = None,
    include_resolved: bool = False,
    limit: int = 1000,
) -> list[StoredDeadLetter]:
    query = (
        f"SELECT {deadletters.columns(deadletters.COLUMNS)} FROM usertrail_dead_letters "
        "WHERE (%s::text IS NULL OR reason = %s)"
    )
    if not include_resolved:
        query += " AND resolved_at IS NULL"
    query += " ORDER BY id LIMIT %s"
    with psycopg.connect(settings.database_dsn()) as conn:
        rows = conn.execute(query, (reason, reason, limit)).fetchall()
    return [StoredDeadLetter(**dict(zip(deadletters.COLUMNS, row, strict=True))) for row in rows]


async def retry(
    settings: Settings, *, reason: str | None = None, unknown_users: UnknownUsers = "park"
) -> tuple[int, int]:
    """Re-drive unresolved dead letters; returns (resolved, still failing)."""
    pending = list_dead_letters(settings, reason=reason, limit=1_000_000)
    writer = Writer(
        settings.database_dsn(),
        group="usertrail-dlq-retry",
        unknown_users=unknown_users,
        # a profile dead letter is written as a profile, not decoded as an event
        profiles_topic=settings.profiles_topic,
    )
    await writer.connect()
    resolved = failing = 0
    try:
        for row in pending:  # one at a time, in the order they arrived
            # judged as the sink judged it: a time bound by the record's timestamp
            stamp = stamped(row.error)
            record = Record(row.topic, row.partition, row.offset, row.key, row.value, stamp)
            result = await writer.write([record], positions=False)
            still_dead = bool(result.dead_letters)
            async with writer.conn.transaction():
                await writer.conn.execute(
                    "UPDATE usertrail_dead_letters SET retries = retries + 1, "
                    "resolved_at = CASE WHEN %s THEN NULL ELSE now() END WHERE id = %s",
                    (still_dead, row.id),
                )
            failing += still_dead
            resolved += not still_dead
    finally:
        await writer.close()
    return resolved, failing
