"""The README's code runs (against the real embedded broker), so it cannot go stale."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from usertrail.producers import decode

from tests.conftest import create_topics, read_all
from usertrail.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
async def test_readme_snippet_runs_and_its_events_arrive(
    index: int, settings: Settings, tmp_path: Path
) -> None:
    await create_topics(settings)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_DATA_DIR": str(tmp_path),
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", SNIPPETS[index]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected = len(re.findall(r"\.(track_\w+|erase_user)\(", SNIPPETS[index]))
    records = await read_all(settings, settings.events_topic, expected=expected)
    assert len(records) == expected
    assert all(decode(value or b"").source in ("web", "backend") for _, _, value in records)


COMMANDS = sorted(
    {
        " ".join(w for w in line.split("#")[0].split()[2:] if not w.startswith("-"))
        for block in re.findall(r"```bash\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if line.startswith("./dev usertrail ")
    }
)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_commands_exist(command: str) -> None:
    from usertrail.cli import build_parser

    words = [w for w in command.split() if not w.isdigit()]
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*words, "--help"])
    assert exited.value.code == 0, command
