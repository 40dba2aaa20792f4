"""Distinct users per service kept as pairs, not counters: a (service, user)
row exists while that user has a row of that service.

0009 counted every pair's interactions, so every statement rewrote a row per
pair it touched (``ON CONFLICT DO UPDATE``): a batch of 5,000 rows of 5,000
users updated 5,000 pair rows, a new version and index entry each, and the
sink's batches cost PostgreSQL about 1.5 times a single COPY of the same
rows (``./dev bench copy_cost``). Now an insert adds only the pairs that are
new (``ON CONFLICT DO NOTHING``: a pair already there costs an index probe
and writes nothing), and a delete or update takes away the pairs none of
whose rows remain. The per-user counts (the dashboard's user lookup) are
read from the rows, through "UserInteraction_userId_service_idx".

Exact under concurrent writers: before it looks for remaining rows, a
delete locks the "User" rows of the users it touched (``FOR UPDATE``). A
writer adding a row holds a key-share lock on its user's "User" row (its
foreign-key check) until it commits, so it has either committed before the
lock is granted (and the look, a statement later with a new snapshot, sees
its row) or it waits for the delete to commit (and then adds the pair
again, which is new by then).

Both triggers' statements are static where the table that fired is in the
schema its session's search path names first (the live tables, and replay
db's shadow tables, written through its own search path): plpgsql plans
them once per session, where 0009's EXECUTE planned each every time. A sink
writing 30-row batches (1,000 events/s) spent more of PostgreSQL's time on
the trigger than on the rows. Elsewhere they are still found by the firing
table's schema.

The functions are new ones (``usertrail_rollup_interactions_pairs``,
``usertrail_rollup_vectors_static``), which this schema's triggers now call:
the functions live in public, and a shadow schema being migrated (``replay
db``) passes through 0009, which replaces 0009's functions; tables already
at 0010 never call them.

Revision ID: 0010_service_user_pairs
Revises: 0009_rollups
"""

from collections.abc import Callable

from alembic import op

revision = "0010_service_user_pairs"
down_revision = "0009_rollups"
branch_labels = None
depends_on = None

# %1$s: the schema (quoted), %2$s: the transition table, $1: +1 or -1, as in
# 0009. The counters are still only appended to.
_COUNTS = [
    """INSERT INTO %1$s.usertrail_rollup_services
         (service, interactions, ratings, rating_sum, users)
       SELECT service, $1 * count(*), $1 * count(rating), $1 * coalesce(sum(rating), 0), 0
       FROM %2$s GROUP BY service""",
    """INSERT INTO %1$s.usertrail_rollup_engagement (bucket, type, interactions)
       SELECT date_bin('15 minutes', "createdAt", TIMESTAMP '2000-01-01'), type, $1 * count(*)
       FROM %2$s WHERE "createdAt" IS NOT NULL GROUP BY 1, 2""",
    """INSERT INTO %1$s.usertrail_rollup_themes (theme, interactions, ratings, rating_sum)
       SELECT theme, $1 * count(*), $1 * count(rating), $1 * coalesce(sum(rating), 0)
       FROM %2$s WHERE theme IS NOT NULL GROUP BY theme""",
]
# the users whose rows went, locked against writers adding rows of theirs
_LOCK_USERS = """SELECT FROM "User" WHERE id IN (SELECT "userId" FROM old_rows)
       ORDER BY id FOR UPDATE"""
_GONE_PAIRS = """WITH gone AS (
         DELETE FROM %1$s.usertrail_rollup_service_users u
         USING (SELECT DISTINCT service, "userId" FROM old_rows) p
         WHERE u.service = p.service AND u."userId" = p."userId"
           AND NOT EXISTS (SELECT FROM %1$s."UserInteraction" i
                           WHERE i."userId" = p."userId" AND i.service = p.service)
         RETURNING u.service
       )
       INSERT INTO %1$s.usertrail_rollup_services
         (service, interactions, ratings, rating_sum, users)
       SELECT service, 0, 0, 0, -count(*) FROM gone GROUP BY service"""
_NEW_PAIRS = """WITH added AS (
         INSERT INTO %1$s.usertrail_rollup_service_users (service, "userId")
         SELECT DISTINCT service, "userId" FROM new_rows ORDER BY 1, 2
         ON CONFLICT (service, "userId") DO NOTHING
         RETURNING service
       )
       INSERT INTO %1$s.usertrail_rollup_services
         (service, interactions, ratings, rating_sum, users)
       SELECT service, 0, 0, 0, count(*) FROM added GROUP BY service"""


# what the pairs of rows already there are (bench/analytics.py fills its rows
# without the triggers, then adds them up)
PAIRS_BACKFILL = """
INSERT INTO usertrail_rollup_service_users (service, "userId")
SELECT DISTINCT service, "userId" FROM "UserInteraction"
"""


def _execute(query: str, rel: str, sign: int | None = None) -> str:
    using = f" USING {sign}" if sign is not None else ""
    return f"      EXECUTE format($q${query}$q$, s, '{rel}'){using};"


def _static(query: str, rel: str, sign: int | None = None) -> str:
    """``query`` with the schema left to the search path: a statement
    plpgsql plans once per session, where EXECUTE plans it every time."""
    query = query.replace("%1$s.", "").replace("%2$s", rel)
    if sign is not None:
        query = query.replace("$1", str(sign))
    return f"      {query};"


def _steps(statement: Callable[..., str], counts: list[str], lock: str | None) -> str:
    """The trigger's statements, each made by ``statement``: ``counts`` for
    the rows a statement took away and added, and for "UserInteraction"
    (``lock`` given) the pairs that went and came."""
    gone = [f"      {lock};", statement(_GONE_PAIRS, "old_rows")] if lock else []
    new = [statement(_NEW_PAIRS, "new_rows")] if lock else []
    old_steps = [statement(q, "old_rows", -1) for q in counts] + gone
    new_steps = [statement(q, "new_rows", 1) for q in counts] + new
    return f"""    IF TG_OP IN ('DELETE', 'UPDATE') THEN
{chr(10).join(old_steps)}
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
{chr(10).join(new_steps)}
    END IF;"""


def _function(name: str, counts: list[str], pairs: bool) -> str:
    """A trigger function whose statements are static where the table that
    fired is in its session's first schema (see above), else found by that
    table's schema."""
    static_lock = "PERFORM 1" + _LOCK_USERS.removeprefix("SELECT") if pairs else None
    dynamic_lock = f"EXECUTE $q${_LOCK_USERS}$q$" if pairs else None
    return f"""
CREATE OR REPLACE FUNCTION public.{name}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  s text := quote_ident(TG_TABLE_SCHEMA);
BEGIN
  IF TG_TABLE_SCHEMA = current_schema() THEN
{_steps(_static, counts, static_lock)}
  ELSE
{_steps(_execute, counts, dynamic_lock)}
  END IF;
  RETURN NULL;
END
$fn$;
"""


_SEGMENTS = """INSERT INTO %1$s.usertrail_rollup_segments
         (segment, users, confidences, confidence_sum)
       SELECT "primarySegment", $1 * count(*), $1 * count("segmentConfidence"),
              $1 * coalesce(sum("segmentConfidence"::numeric), 0)
       FROM %2$s GROUP BY 1"""
FUNCTION = _function("usertrail_rollup_interactions_pairs", _COUNTS, pairs=True)
VECTORS_FUNCTION = _function("usertrail_rollup_vectors_static", [_SEGMENTS], pairs=False)
"""0009's function for user_vectors, with the same static statements."""
FUNCTIONS = {
    "UserInteraction": ("usertrail_rollup_interactions", "usertrail_rollup_interactions_pairs"),
    "user_vectors": ("usertrail_rollup_vectors", "usertrail_rollup_vectors_static"),
}
"""Per table: 0009's function, and this one's."""


def _point_triggers_at(table: str, function: str) -> None:
    for op_, refs in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    ):
        trigger = f"usertrail_rollup_{op_.lower()}"
        op.execute(f'DROP TRIGGER {trigger} ON "{table}"')
        op.execute(
            f'CREATE TRIGGER {trigger} AFTER {op_} ON "{table}" '
            f"REFERENCING {refs} FOR EACH STATEMENT EXECUTE FUNCTION public.{function}()"
        )


def upgrade() -> None:
    op.execute(FUNCTION)
    op.execute(VECTORS_FUNCTION)
    for table, (_, function) in FUNCTIONS.items():
        _point_triggers_at(table, function)
    # the migration holds the triggers' lock until it commits: no row is
    # written in between
    op.execute("DELETE FROM usertrail_rollup_service_users WHERE interactions = 0")
    op.execute("ALTER TABLE usertrail_rollup_service_users DROP COLUMN interactions")


def downgrade() -> None:
    op.execute(
        "ALTER TABLE usertrail_rollup_service_users ADD COLUMN interactions BIGINT NOT NULL "
        "DEFAULT 0"
    )
    op.execute(
        "UPDATE usertrail_rollup_service_users u SET interactions = "
        '(SELECT count(*) FROM "UserInteraction" i '
        'WHERE i."userId" = u."userId" AND i.service = u.service)'
    )
    op.execute("ALTER TABLE usertrail_rollup_service_users ALTER COLUMN interactions DROP DEFAULT")
    # 0009's function is still there (a later 0009 in another schema keeps
    # it current); the new one stays while another schema's tables use it
    for table, (old, new) in FUNCTIONS.items():
        _point_triggers_at(table, old)
        op.execute(
            f"DO $$ BEGIN DROP FUNCTION IF EXISTS public.{new}(); "
            "EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END $$"
        )
