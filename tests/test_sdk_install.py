"""`pip install usertrail` is the SDK alone: the built wheel, installed
without extras into a fresh virtual environment, sends events to a real
broker, and none of the pipeline's dependencies came with it. The
`usertrail` command there says in one line what to install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from usertrail.producers import decode
from usertrail.producers.events import SCHEMA_VERSION
from usertrail.producers.headers import CONTENT_TYPE, SCHEMA_VERSION_HEADER, TRACE_HEADERS

from tests.conftest import create_topics, read_all
from tests.producers.test_headers import _headers_by_event
from usertrail.apache_kafka import KafkaCluster
from usertrail.settings import Settings

ROOT = Path(__file__).parents[1]
SOURCES = ["pyproject.toml", "README.md", "usertrail", "producers", "stream", "sink"]
SOURCES += ["migrations", "replay", "collector", "analytics"]
PIPELINE = {
    "faust-streaming",
    "mode-streaming",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg-binary",
    "prometheus-client",
    "rocksdict",
    "opentelemetry-api",
    # the collector's web server (collector/app.py, analytics/api.py)
    "aiohttp",
    "aiohttp-cors",  # faust-streaming's, with aiohttp
    "yarl",
    "multidict",
}

APP = """
import asyncio, importlib.metadata, json, sys
import usertrail
from usertrail.producers import SyncTrackingClient, TrackingClient
from usertrail.settings import Settings

settings = Settings(kafka_bootstrap_servers=sys.argv[1], events_topic=sys.argv[2])

async def main() -> tuple[list[str], int]:
    ids = []
    async with TrackingClient(source="lean-app", settings=settings) as client:
        for i in range(20):
            ids.append(await client.track_interaction(
                user_id=f"user-{i % 3}", type="reading", service="saju", rating=4))
        report = await client.close()
    return ids, report.delivered

ids, delivered = asyncio.run(main())
with SyncTrackingClient(source="lean-app", settings=settings) as sync:
    ids += [sync.track_interaction(user_id="user-9", type="chat", service="tarot")
            for _ in range(10)]
delivered += 10 if not sync.spool.path.exists() else 0
print(json.dumps({"ids": ids, "delivered": delivered, "version": usertrail.__version__,
                  "metadata": importlib.metadata.version("usertrail")}))
"""

SDK_ONLY = {
    "usertrail",
    "aiokafka",
    "async-timeout",
    "packaging",
    "typing-extensions",
    "cramjam",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pydantic-settings",
    "python-dotenv",
    "pip",
    "setuptools",
}
"""Everything a bare install may hold (the venv's own pip and setuptools
included): anything else that came with the SDK is a dependency to explain."""


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs
    )  # type: ignore[call-overload,no-any-return]


async def test_the_wheel_without_extras_is_the_sdk_and_sends(
    kafka1: KafkaCluster, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(kafka1)
    await create_topics(settings)
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("usertrail-*.whl")
    # the whole pipeline is in the wheel (its extra only adds dependencies)
    with zipfile.ZipFile(wheel) as built_wheel:
        inside = set(built_wheel.namelist())
    where = {"usertrail": "usertrail", "producers": "usertrail/producers"}
    where |= {
        name: f"usertrail/{name}"
        for name in ("stream", "sink", "migrations", "replay", "collector", "analytics")
    }
    for folder, package in where.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                relative = path.relative_to(ROOT / folder).as_posix()
                assert f"{package}/{relative}" in inside, f"{folder}/{relative} is not in the wheel"
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert installed.returncode == 0, installed.stderr

    listed = _run(
        python,
        "-c",
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted(d.metadata['Name'] for d in m.distributions())))",
    )
    names = {n.lower().replace("_", "-") for n in json.loads(listed.stdout)}
    assert {"usertrail", "aiokafka", "pydantic", "cramjam"} <= names
    assert names & PIPELINE == set(), "a pipeline dependency came with the SDK"
    assert names <= SDK_ONLY, f"more than the SDK's dependencies: {sorted(names - SDK_ONLY)}"

    app = tmp_path / "app.py"
    app.write_text(APP)
    sent = _run(python, app, settings.bootstrap_servers, settings.events_topic, cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert result["delivered"] == 30
    assert result["version"] == result["metadata"] != "0.0.0+unknown"
    records = await read_all(settings, settings.events_topic, 30)
    assert {decode(value or b"").event_id for _, _, value in records} == set(result["ids"])
    # the app has no OpenTelemetry: its events say what they are, and carry
    # no trace context
    headers = await _headers_by_event(settings, 30)
    assert set(headers) == set(result["ids"])
    for got in headers.values():
        assert got[CONTENT_TYPE] == b"application/json"
        assert got[SCHEMA_VERSION_HEADER] == str(SCHEMA_VERSION).encode()
        assert not set(TRACE_HEADERS) & set(got), got

    command = _run(venv / "bin" / "usertrail", "--help")
    assert command.returncode == 2
    assert command.stdout == "" and len(command.stderr.splitlines()) == 1, command.stderr
    assert "pip install 'usertrail[pipeline]'" in command.stderr
