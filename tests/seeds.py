"""The seeds SQL (tests/fixtures/seeds.sql) and running SQL on a database."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from usertrail.migrations import runner

from usertrail.settings import Settings

SEEDS_SQL = (Path(__file__).resolve().parent / "fixtures" / "seeds.sql").read_text()


def engine_for(url: str) -> sa.Engine:
    return runner.make_engine(Settings(database_url=url))


def run_sql(engine: sa.Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
