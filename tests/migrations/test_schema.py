"""The migrations make exactly the seeds' schema, on PostgreSQL 15 and 18."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from usertrail.migrations import runner
from usertrail.migrations.catalog import diff, snapshot
from usertrail.migrations.models import PRODUCT_TABLES, Base

from tests.seeds import SEEDS_SQL, engine_for, run_sql
from tests.test_archive_encoding import uncompressed
from usertrail import archive
from usertrail.cli import main


def full_catalog(engine: sa.Engine, tables: tuple[str, ...] = runner.OUR_TABLES) -> dict:
    with engine.connect() as conn:
        return snapshot(conn, "public", tables)


@pytest.fixture
def fresh(database_factory: Callable[[], str]) -> Callable[[], tuple[str, sa.Engine]]:
    engines: list[sa.Engine] = []

    def make() -> tuple[str, sa.Engine]:
        url = database_factory()
        engines.append(engine_for(url))
        return url, engines[-1]

    yield make  # type: ignore[misc]
    for e in engines:
        e.dispose()


def test_migrations_make_the_seeds_schema_exactly(
    fresh: Callable[[], tuple[str, sa.Engine]],
) -> None:
    _, seeded = fresh()
    _, migrated = fresh()
    run_sql(seeded, SEEDS_SQL)
    runner.upgrade(migrated)
    expected, actual = full_catalog(seeded, PRODUCT_TABLES), full_catalog(migrated, PRODUCT_TABLES)
    assert set(expected) == set(PRODUCT_TABLES)
    assert diff(expected, actual) == []
    # and the whole of "User" too, since here both are the minimal one
    with seeded.connect() as a, migrated.connect() as b:
        cols = (
            "SELECT column_name, data_type, is_nullable, column_default FROM "
            "information_schema.columns WHERE table_name = 'User' ORDER BY ordinal_position"
        )
        assert a.exec_driver_sql(cols).all() == b.exec_driver_sql(cols).all()
        rules = (
            "SELECT conname, delete_rule FROM information_schema.referential_constraints r "
            "JOIN pg_constraint c ON c.conname = r.constraint_name ORDER BY 1"
        )
        assert a.exec_driver_sql(rules).all() == b.exec_driver_sql(rules).all()
        assert {rule for _, rule in b.exec_driver_sql(rules)} == {"CASCADE"}


def test_models_match_the_migrations(fresh: Callable[[], tuple[str, sa.Engine]]) -> None:
    _, engine = fresh()
    runner.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": lambda name, kind, parent: (
                    kind != "table" or name != runner.VERSION_TABLE
                ),
            },
        )
        assert compare_metadata(ctx, Base.metadata) == []


def test_upgrade_downgrade_upgrade_gives_an_identical_catalog(
    fresh: Callable[[], tuple[str, sa.Engine]],
) -> None:
    _, engine = fresh()
    runner.upgrade(engine)
    first = full_catalog(engine)
    runner.downgrade(engine, "base")
    assert full_catalog(engine) == {}
    runner.upgrade(engine)
    assert full_catalog(engine) == first
    assert runner.check(engine) == []


def test_downgrading_segments_keeps_every_row_and_other_column(
    fresh: Callable[[], tuple[str, sa.Engine]],
) -> None:
    _, engine = fresh()
    runner.upgrade(engine)
    run_sql(
        engine,
        """
        INSERT INTO "User" (id) VALUES ('u1'), ('u2'), ('u3');
        INSERT INTO user_vectors (id, "userId", vector, "updatedAt", segments, "primarySegment",
                                  "segmentConfidence", "lastSegmentUpdate")
        SELECT 'v' || id, id, jsonb_build_object('love', 0.5), '2026-01-02 03:04:05.678',
               '[{"id": "x"}]', 'tarot-lover', 0.75, '2026-01-02' FROM "User";
    """,
    )
    keep = 'SELECT id, "userId", vector, "createdAt", "updatedAt" FROM user_vectors ORDER BY id'
    with engine.connect() as conn:
        before = conn.exec_driver_sql(keep).all()
    runner.downgrade(engine, "0002_user_vectors")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(keep).all() == before
        columns = {c["name"] for c in sa.inspect(conn).get_columns("user_vectors")}
    assert columns == {"id", "userId", "vector", "createdAt", "updatedAt"}
    runner.upgrade(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(keep).all() == before
        assert (
            conn.exec_driver_sql(
                'SELECT count(*) FROM user_vectors WHERE "primarySegment" IS NULL'
            ).scalar()
            == 3
        )


def test_adopting_a_database_made_from_the_seeds(
    fresh: Callable[[], tuple[str, sa.Engine]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fresh()
    run_sql(
        engine,
        SEEDS_SQL
        + """
        INSERT INTO "User" (id) VALUES ('u1');
        INSERT INTO "UserInteraction" (id, "userId", type, service) VALUES ('i1', 'u1', 'chat', 'saju');
    """,
    )
    assert main(["db", "migrate", "--database-url", url]) == 2
    assert "--adopt" in capsys.readouterr().err
    assert main(["db", "migrate", "--adopt", "--database-url", url]) == 0
    assert (
        "adopted the existing tables as revision 0003_add_user_segments" in capsys.readouterr().out
    )
    assert main(["db", "check", "--database-url", url]) == 0
    assert "No drift" in capsys.readouterr().out
    with engine.connect() as conn:
        assert conn.exec_driver_sql('SELECT count(*) FROM "UserInteraction"').scalar() == 1
        assert runner.current(conn) == runner.head()


def test_adopting_refuses_a_changed_column_and_changes_nothing(
    fresh: Callable[[], tuple[str, sa.Engine]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fresh()
    run_sql(engine, SEEDS_SQL + 'ALTER TABLE "UserInteraction" ALTER COLUMN rating TYPE BIGINT;')
    before = full_catalog(engine)
    assert main(["db", "migrate", "--adopt", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert 'table "UserInteraction": column "rating" is type bigint' in err
    assert "expected type integer" in err
    assert full_catalog(engine) == before
    with engine.connect() as conn:
        assert runner.current(conn) is None


def test_adopting_a_database_with_only_seed_000(fresh: Callable[[], tuple[str, sa.Engine]]) -> None:
    _, engine = fresh()
    seed_000 = SEEDS_SQL.split("-- the base user_vectors")[0]
    run_sql(engine, seed_000)
    assert runner.adopt(engine) == "0001_personalization"
    assert runner.check(engine) == []


def test_check_catches_a_column_added_by_hand(
    fresh: Callable[[], tuple[str, sa.Engine]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fresh()
    runner.upgrade(engine)
    assert main(["db", "check", "--database-url", url]) == 0
    run_sql(engine, 'ALTER TABLE "UserPreferences" ADD COLUMN "favouriteColour" TEXT')
    assert main(["db", "check", "--database-url", url]) == 1
    out = capsys.readouterr().out
    assert 'table "UserPreferences": column "favouriteColour" not expected (type text)' in out


def test_an_existing_product_user_table_is_used_and_never_dropped(
    fresh: Callable[[], tuple[str, sa.Engine]],
) -> None:
    _, engine = fresh()
    run_sql(
        engine,
        'CREATE TABLE "User" (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT);'
        "INSERT INTO \"User\" VALUES ('u1', 'a@b.c', 'Ada');",
    )
    runner.upgrade(engine)
    assert runner.check(engine) == []  # the product's own columns are not drift
    runner.downgrade(engine, "base")
    with engine.connect() as conn:
        assert conn.exec_driver_sql('SELECT email FROM "User"').scalar() == "a@b.c"


def test_status_lists_applied_and_pending(
    fresh: Callable[[], tuple[str, sa.Engine]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fresh()
    runner.upgrade(engine, "0002_user_vectors")
    assert main(["db", "status", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "current revision: 0002_user_vectors" in out
    # every revision after 0002: one file each in migrations/versions
    after = (
        len(list(Path(__file__).parents[2].joinpath("migrations", "versions").glob("0*.py"))) - 2
    )
    assert "pending  0003_add_user_segments" in out and f"{after} migration(s) pending" in out


def test_validate_prints_the_seed_report(
    fresh: Callable[[], tuple[str, sa.Engine]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fresh()
    runner.upgrade(engine)
    run_sql(
        engine,
        """
        INSERT INTO "User" (id) SELECT 'u' || g FROM generate_series(1, 4) g;
        INSERT INTO user_vectors (id, "userId", "updatedAt", "primarySegment", "segmentConfidence")
        VALUES ('v1', 'u1', now(), 'tarot-lover', 0.8), ('v2', 'u2', now(), 'tarot-lover', 0.6),
               ('v3', 'u3', now(), 'critic', 0.9), ('v4', 'u4', now(), NULL, NULL);
    """,
    )
    assert main(["db", "validate", "--json", "--database-url", url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "total": 4,
        "with_segments": 3,
        "percentage": 75.0,
        "distribution": [
            {"primarySegment": "tarot-lover", "count": 2, "avg_confidence": 0.7},
            {"primarySegment": "critic", "count": 1, "avg_confidence": 0.9},
        ],
    }
    assert main(["db", "validate", "--database-url", url]) == 0
    assert "tarot-lover" in capsys.readouterr().out


def test_going_below_0012_gives_the_archive_rows_back_as_the_old_code_reads_them(
    fresh: Callable[[], tuple[str, sa.Engine]],
) -> None:
    """Rows the sink archived compressed (0012) are, after a downgrade to
    0011, the records as they are: what the code before 0012 decodes; a row
    archived before 0012 is left as it was."""
    records = [
        SimpleNamespace(
            offset=o, timestamp=1767225600000 + o, key=b"u1", value=b"{}" * o, headers=[]
        )
        for o in range(300)
    ]
    parts = [(p, records[f : f + 150]) for p in range(2) for f in (0, 150)]
    _, engine = fresh()
    runner.upgrade(engine)
    with engine.begin() as conn:
        for i, (partition, part) in enumerate(parts):
            conn.execute(
                sa.text("INSERT INTO usertrail_archive VALUES ('t', :p, :f, :l, :n, :d)"),
                {
                    "p": partition,
                    "f": part[0].offset,
                    "l": part[-1].offset,
                    "n": len(part),
                    "d": uncompressed(part) if i == 1 else archive.encode(part),  # one from before
                },
            )
    runner.downgrade(engine, "0011_dead_letter_outbox")
    with engine.connect() as conn:
        stored = conn.exec_driver_sql(
            "SELECT data FROM usertrail_archive ORDER BY partition, first_offset"
        ).scalars()
        assert [bytes(d) for d in stored] == [uncompressed(part) for _, part in parts]
