"""API keys of the collector, one per emitting app (a *source*).

A key reads ``ut_<id>_<secret>``: the id finds the row, the secret proves the
holder. Only the secret's SHA-256 is stored (a key is 192 random bits, so a
fast hash is enough: nothing to guess, unlike a password), and the key is
printed once, by ``usertrail keys create``. The collector keeps the table in
memory and reads it again every few seconds: a revoked key stops working
within ``REFRESH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from usertrail.producers.events import check_source

from usertrail.errors import ConfigurationError, UsertrailError

log = logging.getLogger("usertrail.collector")

PREFIX = "ut_"
REFRESH_SECONDS = 5.0


class UnknownKeyError(UsertrailError):
    """No such key id (``usertrail keys list`` shows them)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    source: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(key: str) -> tuple[str, str] | None:
    """The id and secret of a well-formed key; None for anything else."""
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


@contextlib.contextmanager
def _keys_table(dsn: str, **options: Any) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the database holding the keys; a database that was
    never migrated is said in one line (the command's exit code 2)."""
    try:
        with psycopg.connect(dsn, **options) as conn:
            yield conn
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(
            "the database has no API key table: run `usertrail db migrate` first"
        ) from None


def create(dsn: str, source: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for ``source``: its row and the key itself (shown once)."""
    check_source(source)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    with _keys_table(dsn) as conn:
        row = conn.execute(
            "INSERT INTO usertrail_api_keys (id, source, name, secret_sha256) "
            "VALUES (%s, %s, %s, %s) RETURNING created_at",
            (key_id, source, name, _digest(secret)),
        ).fetchone()
    assert row is not None
    return ApiKey(key_id, source, name, row[0], None), f"{PREFIX}{key_id}_{secret}"


def list_keys(dsn: str) -> list[ApiKey]:
    with _keys_table(dsn) as conn:
        rows = conn.execute(
            "SELECT id, source, name, created_at, revoked_at FROM usertrail_api_keys "
            "ORDER BY created_at, id"
        ).fetchall()
    return [ApiKey(*row) for row in rows]


def revoke(dsn: str, key_id: str) -> ApiKey:
    """Revoke a key (again: no change); UnknownKeyError when there is none."""
    with _keys_table(dsn) as conn:
        row = conn.execute(
            "UPDATE usertrail_api_keys SET revoked_at = coalesce(revoked_at, now()) "
            "WHERE id = %s RETURNING id, source, name, created_at, revoked_at",
            (key_id,),
        ).fetchone()
    if row is None:
        raise UnknownKeyError(f"no API key {key_id!r} (usertrail keys list shows them)")
    return ApiKey(*row)


class KeyRing:
    """The live keys, in memory, kept fresh from the table."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._keys: dict[str, tuple[str, str]] = {}  # id -> (digest, source)
        self._refresher: asyncio.Task[None] | None = None

    def load(self) -> int:
        with _keys_table(self._dsn, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT id, secret_sha256, source FROM usertrail_api_keys WHERE revoked_at IS NULL"
            ).fetchall()
        self._keys = {key_id: (digest, source) for key_id, digest, source in rows}
        return len(self._keys)

    def source_for(self, key: str) -> str | None:
        """The source a key stands for; None when it is unknown or revoked."""
        parts = split(key)
        if parts is None:
            return None
        entry = self._keys.get(parts[0])
        if entry is None or not hmac.compare_digest(entry[0], _digest(parts[1])):
            return None
        return entry[1]

    def start(self) -> None:
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self.load)
            except (psycopg.Error, UsertrailError) as exc:
                # the keys known stay in force; a revocation waits for the database
                log.warning("could not refresh the API keys (%s); keeping the last ones", exc)
