"""Analytics rollups: the seeds' reports kept current by PostgreSQL itself.

Statement-level triggers on "UserInteraction" and "user_vectors" fold the
rows each statement inserts, deletes or updates (its transition tables) into
small rollup tables, in the same transaction as the rows: whatever writes
the rows (the sink, ``replay db``'s shadow build, a product deleting a
"User" whose rows cascade), the rollups move with them, exactly once.
docs/analytics.md has the reports and why triggers.

- ``usertrail_rollup_services``: per service, interactions, ratings (count
  and sum) and distinct users (kept exact by
  ``usertrail_rollup_service_users``: interactions per service and user);
- ``usertrail_rollup_engagement``: interactions per 15-minute bucket (UTC)
  and type; any time zone's days are whole buckets;
- ``usertrail_rollup_themes``: per theme, interactions and ratings;
- ``usertrail_rollup_segments``: per primary segment (NULL: none), users and
  the confidences' count and exact sum.

A TRUNCATE of either table empties its rollups.

The counters are appended to, never updated: a statement adds one row per
key it changed, so no transaction waits for another's rollup rows (two
sinks write side by side, and cannot deadlock on them), and the reports add
the rows up. ``usertrail_rollups_compact()`` folds them back to one row per
key (the sink calls it every few seconds). Distinct users per service are
kept exact by a row per service and user, which only that user's events
touch. The functions live in public and find the rollups in the schema of
the table that fired them (the compaction: in the current schema), so the
shadow tables of ``replay db`` keep their own.

Revision ID: 0009_rollups
Revises: 0008_api_keys
"""

from alembic import op

revision = "0009_rollups"
down_revision = "0008_api_keys"
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE usertrail_rollup_services (
  service TEXT NOT NULL,
  interactions BIGINT NOT NULL,
  ratings BIGINT NOT NULL,
  rating_sum BIGINT NOT NULL,
  users BIGINT NOT NULL
);
CREATE TABLE usertrail_rollup_service_users (
  service TEXT NOT NULL,
  "userId" TEXT NOT NULL,
  interactions BIGINT NOT NULL,
  CONSTRAINT usertrail_rollup_service_users_pkey PRIMARY KEY (service, "userId")
);
CREATE TABLE usertrail_rollup_engagement (
  bucket TIMESTAMP NOT NULL,
  type TEXT NOT NULL,
  interactions INTEGER NOT NULL
);
CREATE INDEX usertrail_rollup_engagement_bucket_idx ON usertrail_rollup_engagement (bucket);
CREATE TABLE usertrail_rollup_themes (
  theme TEXT NOT NULL,
  interactions BIGINT NOT NULL,
  ratings BIGINT NOT NULL,
  rating_sum BIGINT NOT NULL
);
CREATE TABLE usertrail_rollup_segments (
  segment TEXT,
  users BIGINT NOT NULL,
  confidences BIGINT NOT NULL,
  confidence_sum NUMERIC NOT NULL
);
"""

# %1$s: the schema (quoted), %2$s: the transition table, $1: +1 or -1.
# The counters are only ever appended to (one row per key and statement):
# no statement waits for another's rows, whatever their order.
INTERACTION_DELTAS = [
    """INSERT INTO %1$s.usertrail_rollup_services
         (service, interactions, ratings, rating_sum, users)
       SELECT service, $1 * count(*), $1 * count(rating), $1 * coalesce(sum(rating), 0), 0
       FROM %2$s GROUP BY service""",
    # distinct users: a pair that appears adds one, a pair whose last
    # interaction goes takes one away
    """WITH pairs AS (
         INSERT INTO %1$s.usertrail_rollup_service_users AS r (service, "userId", interactions)
         SELECT service, "userId", $1 * count(*) FROM %2$s
         GROUP BY service, "userId" ORDER BY service, "userId"
         ON CONFLICT (service, "userId") DO UPDATE
           SET interactions = r.interactions + EXCLUDED.interactions
         RETURNING service, (xmax = 0) AS created, interactions
       )
       INSERT INTO %1$s.usertrail_rollup_services
         (service, interactions, ratings, rating_sum, users)
       SELECT service, 0, 0, 0,
              sum(CASE WHEN created THEN 1 WHEN interactions = 0 THEN -1 ELSE 0 END)
       FROM pairs GROUP BY service
       HAVING sum(CASE WHEN created THEN 1 WHEN interactions = 0 THEN -1 ELSE 0 END) <> 0""",
    """DELETE FROM %1$s.usertrail_rollup_service_users u
       USING (SELECT DISTINCT service, "userId" FROM %2$s) p
       WHERE $1 < 0 AND u.service = p.service AND u."userId" = p."userId"
         AND u.interactions = 0""",
    """INSERT INTO %1$s.usertrail_rollup_engagement (bucket, type, interactions)
       SELECT date_bin('15 minutes', "createdAt", TIMESTAMP '2000-01-01'), type, $1 * count(*)
       FROM %2$s WHERE "createdAt" IS NOT NULL GROUP BY 1, 2""",
    """INSERT INTO %1$s.usertrail_rollup_themes (theme, interactions, ratings, rating_sum)
       SELECT theme, $1 * count(*), $1 * count(rating), $1 * coalesce(sum(rating), 0)
       FROM %2$s WHERE theme IS NOT NULL GROUP BY theme""",
]
VECTOR_DELTAS = [
    """INSERT INTO %1$s.usertrail_rollup_segments (segment, users, confidences, confidence_sum)
       SELECT "primarySegment", $1 * count(*), $1 * count("segmentConfidence"),
              $1 * coalesce(sum("segmentConfidence"::numeric), 0)
       FROM %2$s GROUP BY 1""",
]

# One row per key again, in one statement per table: what it deletes is what
# it adds up; rows appended meanwhile stay for the next time. Two at once
# never count a row twice (the second skips what the first deleted).
COMPACT = """
CREATE OR REPLACE FUNCTION public.usertrail_rollups_compact() RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  WITH gone AS (DELETE FROM usertrail_rollup_services RETURNING *)
  INSERT INTO usertrail_rollup_services
  SELECT service, sum(interactions), sum(ratings), sum(rating_sum), sum(users)
  FROM gone GROUP BY service HAVING sum(interactions) <> 0 OR sum(users) <> 0;
  WITH gone AS (DELETE FROM usertrail_rollup_engagement RETURNING *)
  INSERT INTO usertrail_rollup_engagement
  SELECT bucket, type, sum(interactions) FROM gone GROUP BY 1, 2 HAVING sum(interactions) <> 0;
  WITH gone AS (DELETE FROM usertrail_rollup_themes RETURNING *)
  INSERT INTO usertrail_rollup_themes
  SELECT theme, sum(interactions), sum(ratings), sum(rating_sum)
  FROM gone GROUP BY theme HAVING sum(interactions) <> 0;
  WITH gone AS (DELETE FROM usertrail_rollup_segments RETURNING *)
  INSERT INTO usertrail_rollup_segments
  SELECT segment, sum(users), sum(confidences), sum(confidence_sum)
  FROM gone GROUP BY segment HAVING sum(users) <> 0 OR sum(confidences) <> 0;
END
$fn$;
"""


def _function(name: str, deltas: list[str]) -> str:
    steps = []
    for sign, rel, ops in (
        (-1, "old_rows", "'DELETE', 'UPDATE'"),
        (1, "new_rows", "'INSERT', 'UPDATE'"),
    ):
        body = "\n".join(f"    EXECUTE format($q${d}$q$, s, '{rel}') USING {sign};" for d in deltas)
        steps.append(f"  IF TG_OP IN ({ops}) THEN\n{body}\n  END IF;")
    return f"""
CREATE OR REPLACE FUNCTION public.{name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
  s text := quote_ident(TG_TABLE_SCHEMA);
BEGIN
{chr(10).join(steps)}
  RETURN NULL;
END
$fn$;
"""


def _triggers(table: str, function: str) -> str:
    out = []
    for op_, refs in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    ):
        out.append(
            f'CREATE TRIGGER usertrail_rollup_{op_.lower()} AFTER {op_} ON "{table}" '
            f"REFERENCING {refs} FOR EACH STATEMENT EXECUTE FUNCTION public.{function}();"
        )
    return "\n".join(out)


# what the rows already there add up to (the migration holds the triggers'
# lock on both tables until it commits: no row is written in between)
BACKFILL = """
INSERT INTO usertrail_rollup_services (service, interactions, ratings, rating_sum, users)
SELECT service, count(*), count(rating), coalesce(sum(rating), 0), count(DISTINCT "userId")
FROM "UserInteraction" GROUP BY service;
INSERT INTO usertrail_rollup_service_users (service, "userId", interactions)
SELECT service, "userId", count(*) FROM "UserInteraction" GROUP BY 1, 2;
INSERT INTO usertrail_rollup_engagement (bucket, type, interactions)
SELECT date_bin('15 minutes', "createdAt", TIMESTAMP '2000-01-01'), type, count(*)
FROM "UserInteraction" WHERE "createdAt" IS NOT NULL GROUP BY 1, 2;
INSERT INTO usertrail_rollup_themes (theme, interactions, ratings, rating_sum)
SELECT theme, count(*), count(rating), coalesce(sum(rating), 0)
FROM "UserInteraction" WHERE theme IS NOT NULL GROUP BY theme;
INSERT INTO usertrail_rollup_segments (segment, users, confidences, confidence_sum)
SELECT "primarySegment", count(*), count("segmentConfidence"),
       coalesce(sum("segmentConfidence"::numeric), 0)
FROM user_vectors GROUP BY 1;
"""


TRUNCATED = """
CREATE OR REPLACE FUNCTION public.usertrail_rollup_truncated() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  s text := quote_ident(TG_TABLE_SCHEMA);
  t text;
BEGIN
  FOREACH t IN ARRAY CASE WHEN TG_TABLE_NAME = 'user_vectors' THEN ARRAY['segments']
    ELSE ARRAY['services', 'service_users', 'engagement', 'themes'] END
  LOOP
    EXECUTE format('DELETE FROM %s.%I', s, 'usertrail_rollup_' || t);
  END LOOP;
  RETURN NULL;
END
$fn$;
CREATE TRIGGER usertrail_rollup_truncate AFTER TRUNCATE ON "UserInteraction"
  FOR EACH STATEMENT EXECUTE FUNCTION public.usertrail_rollup_truncated();
CREATE TRIGGER usertrail_rollup_truncate AFTER TRUNCATE ON "user_vectors"
  FOR EACH STATEMENT EXECUTE FUNCTION public.usertrail_rollup_truncated();
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(_function("usertrail_rollup_interactions", INTERACTION_DELTAS))
    op.execute(_function("usertrail_rollup_vectors", VECTOR_DELTAS))
    op.execute(_triggers("UserInteraction", "usertrail_rollup_interactions"))
    op.execute(_triggers("user_vectors", "usertrail_rollup_vectors"))
    op.execute(TRUNCATED)
    op.execute(COMPACT)
    op.execute(BACKFILL)


def downgrade() -> None:
    for table in ("UserInteraction", "user_vectors"):
        for op_ in ("insert", "delete", "update", "truncate"):
            op.execute(f'DROP TRIGGER IF EXISTS usertrail_rollup_{op_} ON "{table}"')
    for name in (
        "services",
        "service_users",
        "engagement",
        "themes",
        "segments",
    ):
        op.execute(f"DROP TABLE IF EXISTS usertrail_rollup_{name}")
    # the functions stay while another schema's tables (a shadow) use them
    op.execute(
        "DO $$ BEGIN "
        "DROP FUNCTION IF EXISTS public.usertrail_rollup_interactions(); "
        "DROP FUNCTION IF EXISTS public.usertrail_rollup_vectors(); "
        "DROP FUNCTION IF EXISTS public.usertrail_rollup_truncated(); "
        "DROP FUNCTION IF EXISTS public.usertrail_rollups_compact(); "
        "EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END $$"
    )
