"""The STYLE habits hold: ruff's curated rules and its formatting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_passes() -> None:
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes(tmp_path: Path) -> None:
    """mypy --strict (pyproject.toml) over every part, as the installed
    ``usertrail`` package: the parts' folders are linked into one tree, since
    they install as subpackages (pyproject.toml, package-dir)."""
    tree = tmp_path / "usertrail"
    tree.mkdir()
    for path in (ROOT / "usertrail").iterdir():
        (tree / path.name).symlink_to(path)
    for part in ("producers", "stream", "sink", "migrations", "replay", "collector", "analytics"):
        (tree / part).symlink_to(ROOT / part)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "-p",
            "usertrail",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checked = re.search(r"Success: no issues found in (\d+) source files", result.stdout)
    assert checked is not None and int(checked.group(1)) > 40, result.stdout
