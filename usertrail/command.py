"""The ``usertrail`` command's entry point. With only the SDK installed
(``pip install usertrail``) the command's own dependencies are missing: it
says so in one line (exit code 2) instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

PIPELINE_MODULES = frozenset(
    {"faust", "mode", "rocksdict", "sqlalchemy", "alembic", "psycopg", "prometheus_client"}
)
"""What ``usertrail[pipeline]`` brings (top-level module names)."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from usertrail.cli import main as run
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in PIPELINE_MODULES:
            raise
        sys.stderr.write(
            f"usertrail: error: the command needs the pipeline's dependencies ({missing} is "
            "not installed): pip install 'usertrail[pipeline]'\n"
        )
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
