"""``usertrail segments backfill`` on a database made from the seeds' SQL,
holding rows from before the pipeline: every user ends with a segment."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
import sqlalchemy as sa

from tests.seeds import SEEDS_SQL, engine_for, run_sql
from usertrail.cli import main

LEGACY = """
INSERT INTO "User" (id) SELECT 'ck' || g FROM generate_series(1, 30) g;
-- ck1: a tarot reader, rating well
INSERT INTO "UserInteraction" (id, "userId", "createdAt", type, service, theme, rating)
SELECT 'cl-a' || g, 'ck1', timestamp '2025-01-01' + g * interval '1 day', 'reading', 'tarot',
       'love', 5 FROM generate_series(1, 10) g;
-- ck2: a critic of saju
INSERT INTO "UserInteraction" (id, "userId", "createdAt", type, service, rating)
SELECT 'cl-b' || g, 'ck2', timestamp '2025-02-01' + g * interval '1 hour', 'feedback', 'saju', 1
FROM generate_series(1, 6) g;
-- ck3: one row the event contract refuses (a service that is not a slug)
INSERT INTO "UserInteraction" (id, "userId", "createdAt", type, service)
VALUES ('cl-c1', 'ck3', timestamp '2025-03-01', 'chat', 'Tarot Cards!');
-- ck4: nothing done yet, but said love at onboarding (kept as preferred themes)
INSERT INTO "UserPreferences" (id, "userId", "preferredThemes", "preferredServices")
VALUES ('p4', 'ck4', '["love"]', '["tarot"]');
-- some vectors exist already (from before segmentation), most do not
INSERT INTO user_vectors (id, "userId", vector, "updatedAt")
VALUES ('v1', 'ck1', '{"kept": 1.0}', now()), ('v5', 'ck5', '{}', now());
"""


@pytest.fixture
def legacy(database_factory: Callable[[], str]) -> tuple[str, sa.Engine]:
    url = database_factory()
    engine = engine_for(url)
    run_sql(engine, SEEDS_SQL)
    run_sql(engine, LEGACY)
    yield url, engine  # type: ignore[misc]
    engine.dispose()


def vectors(url: str) -> dict[str, tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                'SELECT "userId", vector, segments, "primarySegment", "segmentConfidence", '
                '"lastSegmentUpdate" FROM user_vectors'
            )
        }


def test_backfill_gives_every_user_a_segment_and_is_idempotent(
    legacy: tuple[str, sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = legacy
    assert main(["segments", "backfill", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "segments computed for 30 users (28 vectors created) from 17 interactions" in out
    assert "1 rows the event contract refuses left out" in out
    assert "    30 |            30 |     100.00" in out  # seed 002's coverage query
    rows = vectors(url)
    assert len(rows) == 30 and all(r[2] is not None for r in rows.values())
    assert rows["ck1"][2] == "tarot-devotee" and rows["ck1"][0] == {"kept": 1.0}
    assert rows["ck2"][2] in ("critic", "saju-regular")
    assert "average rating 1.0 over 6 ratings" in str(rows["ck2"][1])
    assert rows["ck4"][2] == "love-seeker"
    assert rows["ck30"][2] == "explorer"
    assert str(rows["ck1"][4]).startswith("2025-01-11")  # the newest reading, not the clock
    assert main(["segments", "backfill", "--database-url", url]) == 0
    assert vectors(url) == rows
