"""Each part depends only downward (docs/architecture.md, "Parts"), and the
pure modules load no Kafka client, no faust and no database driver."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# part -> the parts it may import (itself included); "core" is usertrail/
# without the command line, which may import everything
MAY_IMPORT = {
    "core": {"core"},
    "producers": {"core", "producers"},
    "stream": {"core", "producers", "stream"},
    "sink": {"core", "producers", "sink"},
    "migrations": {"core", "migrations"},
    "replay": {"core", "producers", "stream", "sink", "migrations", "replay"},
    "collector": {"core", "producers", "collector"},
    "analytics": {"core", "analytics"},
}
FOLDERS = {
    "producers": "producers",
    "stream": "stream",
    "sink": "sink",
    "migrations": "migrations",
    "replay": "replay",
    "collector": "collector",
    "analytics": "analytics",
    "usertrail": "core",
}
PURE = [
    "usertrail.producers.events",
    "usertrail.producers.profiles",
    "usertrail.stream.fold",
    "usertrail.stream.segments",
    "usertrail.stream.state",
    "usertrail.stream.policy",
    "usertrail.sink.plan",
    "usertrail.sink.rows",
]
HEAVY = ("faust", "mode", "aiokafka", "psycopg", "sqlalchemy", "alembic")


def part_of(module: str) -> str | None:
    """The part a ``usertrail.*`` module belongs to (None: not ours, or the CLI)."""
    names = module.split(".")
    if names[0] != "usertrail":
        return None
    if len(names) > 1 and names[1] in MAY_IMPORT and names[1] != "core":
        return names[1]
    if len(names) > 1 and names[1] == "cli":
        return None
    return "core"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def violations(root: Path) -> tuple[int, list[str]]:
    """The modules under ``root`` checked, and each import that goes up."""
    wrong = []
    checked = 0
    for folder, part in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if part == "core" and path.relative_to(root / folder).parts[0] == "cli":
                continue
            checked += 1
            for module in sorted(imports(path)):
                other = part_of(module)
                if other is not None and other not in MAY_IMPORT[part]:
                    wrong.append(f"{path.relative_to(root)} ({part}) imports {module} ({other})")
    return checked, wrong


def test_every_part_imports_only_the_parts_below_it() -> None:
    checked, wrong = violations(ROOT)
    assert checked > 40, "the parts' modules were found"
    assert not wrong, "\n".join(wrong)


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "sink").mkdir()
    (tmp_path / "stream").mkdir()
    (tmp_path / "sink" / "w.py").write_text(
        "from usertrail.producers.events import decode\n"
        "def f():\n    from usertrail.replay.db import rebuild\n"
    )
    (tmp_path / "stream" / "a.py").write_text("import usertrail.sink.plan\n")
    assert violations(tmp_path) == (
        2,
        [
            "stream/a.py (stream) imports usertrail.sink.plan (sink)",
            "sink/w.py (sink) imports usertrail.replay.db (replay)",
            "sink/w.py (sink) imports usertrail.replay.db.rebuild (replay)",
        ],
    )


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_no_client_or_driver(module: str) -> None:
    code = (
        f"import sys, {module}\nprint(' '.join(sorted(n for n in {HEAVY!r} if n in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"
