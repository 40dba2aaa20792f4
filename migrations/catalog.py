"""The schema as PostgreSQL's catalog sees it, and the differences between two.

A snapshot lists, per table: columns (type, nullability, default), indexes
(their definition: columns, order, uniqueness, method) and constraints
(primary key, unique, foreign key with its delete rule, check). Two snapshots
taken in different schemas or databases compare equal when the tables are
the same. For "User", which the product owns, only ``id`` and the primary key
are ours to compare.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, text

Snapshot = dict[str, dict[str, dict[str, Any]]]

_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attidentity
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = :schema AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
"""
_INDEXES = """
SELECT t.relname, i.relname, pg_get_indexdef(ix.indexrelid)
FROM pg_index ix
JOIN pg_class i ON i.oid = ix.indexrelid
JOIN pg_class t ON t.oid = ix.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = :schema
"""
_CONSTRAINTS = """
SELECT t.relname, con.conname, pg_get_constraintdef(con.oid)
FROM pg_constraint con
JOIN pg_class t ON t.oid = con.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = :schema AND con.contype IN ('p', 'u', 'f', 'c')
"""
PRODUCT_OWNED = "User"


def snapshot(conn: Connection, schema: str, tables: Iterable[str] | None = None) -> Snapshot:
    """The catalog of ``tables`` (default: all) in ``schema``."""
    wanted = set(tables) if tables is not None else None
    out: Snapshot = {}

    def table(name: str) -> dict[str, dict[str, Any]] | None:
        if wanted is not None and name not in wanted:
            return None
        return out.setdefault(name, {"columns": {}, "indexes": {}, "constraints": {}})

    def unqualify(sql: str) -> str:
        return sql.replace(f'"{schema}".', "").replace(f"{schema}.", "")

    for tname, col, type_, notnull, default, identity in conn.execute(
        text(_COLUMNS), {"schema": schema}
    ):
        if (t := table(tname)) is not None:
            if tname == PRODUCT_OWNED and col != "id":
                continue
            t["columns"][col] = {
                "type": type_,
                "not null": notnull,
                "default": unqualify(default) if default else None,
                "identity": identity or None,
            }
    for tname, name, definition in conn.execute(text(_INDEXES), {"schema": schema}):
        if (t := table(tname)) is not None:
            if tname == PRODUCT_OWNED and name != "User_pkey":
                continue
            t["indexes"][name] = unqualify(definition)
    for tname, name, definition in conn.execute(text(_CONSTRAINTS), {"schema": schema}):
        if (t := table(tname)) is not None:
            if tname == PRODUCT_OWNED and name != "User_pkey":
                continue
            t["constraints"][name] = unqualify(definition)
    return out


def diff(expected: Snapshot, actual: Snapshot) -> list[str]:
    """Readable differences, one line each; empty when the same."""
    lines: list[str] = []
    for tname in sorted(set(expected) | set(actual)):
        if tname not in actual:
            lines.append(f'table "{tname}": missing')
            continue
        if tname not in expected:
            lines.append(f'table "{tname}": not expected')
            continue
        for part in ("columns", "indexes", "constraints"):
            want, have = expected[tname][part], actual[tname][part]
            label = part[:-1] if part != "indexes" else "index"
            for name in sorted(set(want) | set(have)):
                if name not in have:
                    lines.append(f'table "{tname}": {label} "{name}" missing ({_fmt(want[name])})')
                elif name not in want:
                    lines.append(
                        f'table "{tname}": {label} "{name}" not expected ({_fmt(have[name])})'
                    )
                elif want[name] != have[name]:
                    lines.append(
                        f'table "{tname}": {label} "{name}" is {_fmt(have[name])}, '
                        f"expected {_fmt(want[name])}"
                    )
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v not in (None, False)) or "-"
    return str(value)
