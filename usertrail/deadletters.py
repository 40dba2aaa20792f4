"""Dead letters, said once: the columns of ``usertrail_dead_letters`` (the
table the sink writes in a batch's transaction, the record of truth) and
the record that stands for one on the dead-letter topic (published by the
sink, and again by the archive's restore)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from aiokafka.errors import KafkaError

COLUMNS = (
    "id",
    "reason",
    "error",
    "topic",
    "partition",
    "offset",
    "key",
    "value",
    "event_id",
    "user_id",
    "received_at",
    "retries",
    "resolved_at",
    "unpublished",
)
"""Every column, in the table's order (migrations/models.py)."""
WRITTEN = (*COLUMNS[1:10], "unpublished")
"""What the sink writes; the database gives the rest."""
COPIED = COLUMNS[1:]
"""What moves with a dead letter from one table to another (not its id)."""
ERROR_MAX = 10_000
"""Characters of the error kept in the table."""
MAX_BYTES = 512 * 1024
"""A dead letter's value on the topic at most (the table keeps every byte):
beyond what a topic takes by default (1 MB), the first bytes are sent."""


def columns(names: tuple[str, ...]) -> str:
    """The names as a SQL column list (``offset`` is a keyword)."""
    return ", ".join(f'"{n}"' for n in names)


class Message(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def message(
    reason: str,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
) -> Message:
    """The dead-letter topic's record for the record at ``topic``/``partition``/
    ``offset``: its key and value, cut to what any topic takes, and headers
    saying why and whence."""
    headers = [
        ("reason", reason.encode()),
        ("error", error[:1000].encode()),
        ("source", f"{topic}/{partition}/{offset}".encode()),
    ]
    if value is not None and len(value) > MAX_BYTES:
        headers.append(("truncated-from", str(len(value)).encode()))
        value = value[:MAX_BYTES]
    if key is not None and len(key) > MAX_BYTES // 8:
        headers.append(("key-truncated-from", str(len(key)).encode()))
        key = key[: MAX_BYTES // 8]
    if key is None and value is None:
        # a producer sends a key or a value (aiokafka asserts it): this
        # record's empty value stands for its null
        headers.append(("value-null", b"true"))
        value = b""
    return Message(key, value, headers)


async def send(
    producer: Any, topic: str, rows: Iterable[Sequence[Any]]
) -> tuple[list[Any], list[BaseException]]:
    """Each (id, reason, error, topic, partition, offset, key, value) onto
    ``topic`` through an aiokafka producer: the ids the broker acknowledged,
    and what failed (one refused at once, too big for the topic say, does
    not stop the rest)."""
    ids: list[Any] = []
    sent: list[Any] = []
    failed: list[BaseException] = []
    for dead_id, *dead in rows:
        key, value, headers = message(*dead)
        try:
            sent.append(await producer.send(topic, value, key=key, headers=headers))
        except KafkaError as exc:
            failed.append(exc)
            continue
        ids.append(dead_id)
    acknowledged = []
    for dead_id, outcome in zip(
        ids, await asyncio.gather(*sent, return_exceptions=True), strict=True
    ):
        if isinstance(outcome, BaseException):
            failed.append(outcome)
        else:
            acknowledged.append(dead_id)
    return acknowledged, failed
