"""The command line refuses bad values before anything starts."""

from __future__ import annotations

import socket

import pytest

from usertrail.settings import Settings


@pytest.mark.parametrize("command", ["sink", "stream"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_batch_max_must_be_a_positive_whole_number(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from usertrail.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--batch-max", value])
    assert exited.value.code == 2
    assert "--batch-max" in capsys.readouterr().err
    assert build_parser().parse_args([command, "--batch-max", "7"]).batch_max == 7


DOWN = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "DATABASE_URL": "postgresql://u@127.0.0.1:2/x"}


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("verify", 4),
        ("replay db", 4),
        ("replay stream", 4),
        ("log restore", 4),
        ("demo --users 2 --events 10", 4),
        ("dlq list", 5),
        ("db status", 5),
        ("db validate", 5),
        ("segments backfill", 5),
        ("analytics services", 5),
        ("analytics engagement --days 7", 5),
        ("dashboard", 5),
    ],
)
def test_a_broker_or_database_that_is_down_is_one_line_and_an_exit_code(
    command: str, code: int, tmp_path: object
) -> None:
    """Ports nothing listens on: one line on stderr, the documented code
    (4: the broker, 5: the database), never a traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("USERTRAIL_")}
    done = subprocess.run(
        [sys.executable, "-m", "usertrail.cli", *command.split(), "--log-level", "WARNING"],
        env={**env, **DOWN, "USERTRAIL_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usertrail: error: cannot reach"), lines


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ({}, "http://127.0.0.1:6066"),
        ({"stream_web_host": "127.0.0.3"}, "http://127.0.0.3:6066"),
        ({"stream_web_advertise": "w1.internal"}, "http://w1.internal:6066"),
        ({"stream_web_advertise": "w1:7000"}, "http://w1:7000"),
        ({"stream_web_advertise": "https://w1.example/"}, "https://w1.example:6066"),
    ],
)
def test_a_worker_advertises_where_other_workers_reach_it(given: dict[str, str], url: str) -> None:
    assert Settings(**given).web_url(6066) == url  # type: ignore[arg-type]
    if not given:  # listening on every address: the machine's name
        named = Settings(stream_web_host="0.0.0.0").web_url(6066)
        assert named == f"http://{socket.gethostname()}:6066"
