"""PostgreSQL's CPU per row for the same interactions written as one COPY or
as COPYs of a sink batch's size, with the analytics rollup trigger
(docs/analytics.md) and without it: what the sink's batches cost the server
beyond a raw COPY. Prints, per round and case, rows/s, the server's CPU per
row (every process of it) and the WAL records written.

    ./dev bench copy_cost [--rows 50000] [--batch 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psycopg
from sink_rate import fresh_database, make_events, tree_cpu
from usertrail.sink.rows import interaction_copy_rows

from usertrail.embedded import EmbeddedPostgres, free_port

COPY = (
    'COPY "UserInteraction" (id, "userId", "createdAt", type, service, theme, rating, '
    "metadata) FROM STDIN"
)


def case(pg: EmbeddedPostgres, lines: list[bytes], size: int, rollups: bool) -> str:
    url = fresh_database(pg, "bench_copy")
    with psycopg.connect(url) as conn:
        if not rollups:
            conn.execute('ALTER TABLE "UserInteraction" DISABLE TRIGGER usertrail_rollup_insert')
            conn.commit()

        def wal() -> int:
            row = conn.execute("SELECT wal_records FROM pg_stat_wal").fetchone()
            assert row is not None
            return int(row[0])

        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.commit()
        records, cpu, started = wal(), tree_cpu(pg.pid), time.perf_counter()
        for i in range(0, len(lines), size):
            with conn.cursor() as cur, cur.copy(COPY) as copy:
                copy.write(b"".join(lines[i : i + size]))
        conn.commit()
        seconds, cpu = time.perf_counter() - started, tree_cpu(pg.pid) - cpu
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.commit()
        records = wal() - records
    n = len(lines)
    return (
        f"{n / seconds:8,.0f} rows/s  PostgreSQL {cpu / n * 1e6:5.1f} us/row  "
        f"WAL records {records:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per COPY (the sink's batch)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    lines = interaction_copy_rows(make_events(args.rows)).splitlines(keepends=True)
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(data_dir=Path(tmp) / "pg", port=free_port(), database="bench")
        pg.start()
        try:
            for r in range(args.rounds):
                for rollups in (True, False):
                    for size in (args.rows, args.batch):
                        what = f"{'one COPY' if size == args.rows else f'COPYs of {size:,}'}"
                        label = f"{what}, rollups {'on' if rollups else 'off'}"
                        print(f"round {r + 1}: {label:28s} {case(pg, lines, size, rollups)}")
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
