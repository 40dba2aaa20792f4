"""A few rows written straight into the product's tables, as the product
(or a database older than the rollups) would have them."""

from __future__ import annotations

import psycopg


def fill(url: str) -> None:
    """Users a and b: three interactions (one at 23:50 UTC on April 30,
    May 1 in Seoul) and a profile each, a's with a primary segment."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO "User" (id) VALUES ('a'), ('b')""")
        conn.execute(
            'INSERT INTO "UserInteraction" (id, "userId", "createdAt", type, service, theme, '
            "rating) VALUES ('1', 'a', '2026-04-30 23:50', 'reading', 'tarot', 'love', 5), "
            "('2', 'a', '2026-05-01 00:10', 'chat', 'tarot', NULL, NULL), "
            "('3', 'b', '2026-05-02 12:00', 'reading', 'saju', 'career', 2)"
        )
        conn.execute(
            'INSERT INTO user_vectors (id, "userId", "updatedAt", segments, "primarySegment", '
            "\"segmentConfidence\") VALUES ('a', 'a', now(), "
            '\'[{"segment": "seeker", "score": 0.7, "reasons": ["2 of 2 were tarot"]}]\', '
            "'seeker', 0.7), ('b', 'b', now(), '[]', NULL, NULL)"
        )
