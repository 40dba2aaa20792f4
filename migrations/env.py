"""Alembic environment for usertrail.

Run through ``usertrail db ...`` (``usertrail.migrations.runner``), which
passes an open connection, and optionally a schema: every statement then
lands in that schema (used to build the expected catalog in a scratch schema).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from usertrail.migrations.models import Base

VERSION_TABLE = "usertrail_alembic_version"

config = context.config
connection = config.attributes["connection"]
schema = config.attributes.get("schema")
if schema:
    # the schema first; "also" (replay db's shadow tables) lets references
    # such as the product's "User" resolve to the live table behind it
    also = "".join(f', "{s}"' for s in config.attributes.get("also", ()))
    connection.execute(text(f'SET search_path TO "{schema}"{also}'))

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    version_table_schema=schema,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
