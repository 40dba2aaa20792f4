"""What ``usertrail db ...`` does: migrate, downgrade, status, check, adopt,
validate.

The migrations define the schema. The *expected* catalog at any revision is
made by migrating an empty scratch schema to it, inside a transaction that
is always rolled back, so nothing is left behind and no second database is
needed. ``check`` and ``--adopt`` compare the live tables with it.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from usertrail.migrations.catalog import Snapshot, diff, snapshot
from usertrail.migrations.models import PIPELINE_TABLES, PRODUCT_TABLES

from usertrail.errors import DatabaseUnavailableError, UsertrailError
from usertrail.settings import Settings

log = logging.getLogger("usertrail.migrations")

SCRIPT_LOCATION = Path(__file__).resolve().parent
VERSION_TABLE = "usertrail_alembic_version"
OUR_TABLES = (*PRODUCT_TABLES, *PIPELINE_TABLES)


class MigrationError(UsertrailError):
    """The schema cannot be changed as asked; the message says why."""


class SchemaDrift(UsertrailError):
    """The live tables differ from what the migrations define."""

    def __init__(self, message: str, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(message + "\n" + "\n".join(f"  - {d}" for d in differences))


def make_engine(settings: Settings) -> Engine:
    return create_engine(settings.sqlalchemy_url(), pool_pre_ping=True)


def _config(conn: Connection, schema: str | None = None, also: tuple[str, ...] = ()) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["connection"] = conn
    if schema is not None:
        cfg.attributes["schema"] = schema
        cfg.attributes["also"] = also
    return cfg


def upgrade_into(conn: Connection, schema: str, also: tuple[str, ...] = ("public",)) -> None:
    """The migrations' tables in ``schema`` (created by the caller), with
    names the migrations do not create there (the product's "User")
    resolved in ``also``: shadow tables identical to the live ones."""
    command.upgrade(_config(conn, schema=schema, also=also), "head")
    conn.execute(text("SET search_path TO DEFAULT"))


@functools.cache
def _script() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    return ScriptDirectory.from_config(cfg)


def revisions() -> list[str]:
    """Every revision id, oldest first."""
    return [s.revision for s in reversed(list(_script().walk_revisions()))]


def head() -> str:
    return revisions()[-1]


def current(conn: Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach PostgreSQL: {str(exc.orig).strip().splitlines()[0]}"
        ) from exc


def upgrade(engine: Engine, target: str = "head") -> None:
    with _connect(engine) as conn:
        try:
            with conn.begin():
                command.upgrade(_config(conn), target)
        except ProgrammingError as exc:
            if "already exists" in str(exc.orig):
                raise MigrationError(
                    f"{str(exc.orig).strip()}: the database already has these tables "
                    "(made by Prisma?). Run `usertrail db migrate --adopt` to adopt them "
                    "if they match."
                ) from exc
            raise


def downgrade(engine: Engine, target: str) -> None:
    if target not in (*revisions(), "base") and not target.startswith("-"):
        raise MigrationError(f"unknown revision {target!r}; known: base, {', '.join(revisions())}")
    with _connect(engine) as conn, conn.begin():
        command.downgrade(_config(conn), target)


def stamp(conn: Connection, target: str) -> None:
    command.stamp(_config(conn), target)


def current_schema(conn: Connection) -> str:
    return str(conn.execute(text("SELECT current_schema()")).scalar())


def expected_snapshot(engine: Engine, revision: str | None) -> Snapshot:
    """The catalog the migrations make at ``revision`` (None: nothing)."""
    if revision is None:
        return {}
    scratch = f"usertrail_expected_{uuid.uuid4().hex[:12]}"
    with _connect(engine) as conn:
        trans = conn.begin()
        try:
            conn.execute(text(f'CREATE SCHEMA "{scratch}"'))
            command.upgrade(_config(conn, schema=scratch), revision)
            snap = snapshot(conn, scratch, OUR_TABLES)
        finally:
            trans.rollback()
    return snap


def live_snapshot(conn: Connection) -> Snapshot:
    return snapshot(conn, current_schema(conn), OUR_TABLES)


@dataclass(frozen=True)
class Status:
    current: str | None
    head: str
    pending: list[str]
    applied: list[str]


def status(engine: Engine) -> Status:
    with _connect(engine) as conn:
        cur = current(conn)
    order = revisions()
    done = order[: order.index(cur) + 1] if cur else []
    return Status(cur, order[-1], order[len(done) :], done)


def check(engine: Engine) -> list[str]:
    """Differences between the live tables and the migrations' head."""
    expected = expected_snapshot(engine, head())
    with _connect(engine) as conn:
        cur = current(conn)
        differences = diff(expected, live_snapshot(conn))
    if cur != head():
        differences.insert(
            0,
            f"database is at revision {cur or 'base'}, head is {head()} "
            "(run `usertrail db migrate`)",
        )
    return differences


def adopt(engine: Engine) -> str | None:
    """Migrate to head, stamping instead of running the revisions whose tables
    already exist and match exactly (the seed's "Option B: baseline").

    Returns the revision stamped, or None when nothing needed stamping.
    Refuses, changing nothing, when existing tables differ.
    """
    order = revisions()
    with _connect(engine) as conn:
        cur = current(conn)
        live = live_snapshot(conn)
    start = order.index(cur) + 1 if cur else 0
    candidates: list[str | None] = [*reversed(order[start:]), cur]
    tried: list[tuple[str | None, list[str]]] = []
    for revision in candidates:
        differences = diff(expected_snapshot(engine, revision), live)
        if not differences:
            if revision != cur and revision is not None:
                with _connect(engine) as conn, conn.begin():
                    stamp(conn, revision)
                log.info("adopted existing tables: stamped %s", revision)
            upgrade(engine)
            return revision if revision != cur else None
        tried.append((revision, differences))
    # No revision matches: show the differences against the one whose set of
    # tables is closest to what exists.
    revision, differences = min(
        tried, key=lambda t: sum(1 for d in t[1] if d.endswith(": missing") or "not expected" in d)
    )
    raise SchemaDrift(
        f"existing tables do not match any revision (closest: {revision or 'base'}); "
        "nothing was changed. Differences:",
        differences,
    )


# --- seed 002 validation queries ------------------------------------------------------
# As the seed writes them, except that the coverage percentage divides by
# NULLIF(COUNT(*), 0): the seed's query fails with "division by zero" on an
# empty table.
COVERAGE_SQL = """
SELECT
  COUNT(*) as total,
  COUNT("primarySegment") as with_segments,
  ROUND(COUNT("primarySegment")::numeric / NULLIF(COUNT(*), 0)::numeric * 100, 2) as percentage
FROM user_vectors
"""
DISTRIBUTION_SQL = """
SELECT
  "primarySegment",
  COUNT(*) as count,
  ROUND(AVG("segmentConfidence")::numeric, 2) as avg_confidence
FROM user_vectors
WHERE "primarySegment" IS NOT NULL
GROUP BY "primarySegment"
ORDER BY count DESC
"""


def validate(engine: Engine) -> dict[str, Any]:
    with _connect(engine) as conn:
        total, with_segments, percentage = conn.execute(text(COVERAGE_SQL)).one()
        distribution = [
            {"primarySegment": seg, "count": count, "avg_confidence": _num(avg)}
            for seg, count, avg in conn.execute(text(DISTRIBUTION_SQL))
        ]
    return {
        "total": total,
        "with_segments": with_segments,
        "percentage": _num(percentage),
        "distribution": distribution,
    }


def _num(value: Decimal | float | None) -> float | None:
    return None if value is None else float(value)


def prepare(settings: Settings, migrate: bool) -> None:
    """``usertrail up``'s database step: the embedded database is always
    migrated, a real one only when asked (``migrate``); pending migrations
    left are refused."""
    engine = make_engine(settings)
    try:
        if migrate or settings.embedded_db:
            upgrade(engine)
        st = status(engine)
        if st.pending:
            raise UsertrailError(
                f"the database is at {st.current or 'base'} with {len(st.pending)} migration(s) "
                "pending: run `usertrail db migrate` (or `up --migrate`)"
            )
    finally:
        engine.dispose()
