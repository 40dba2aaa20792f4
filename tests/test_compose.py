"""compose/: no Docker engine runs here, so the file is checked statically."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from usertrail.cli import build_parser
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
            monkeypatch.setenv(key, re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", str(value)))
        settings = Settings()
        assert not settings.embedded_kafka and not settings.embedded_db
        dockerfile = (
            ROOT / service["build"]["context"].replace("..", ".") / service["build"]["dockerfile"]
        )
        for src in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{dockerfile} copies missing {part}"
    assert found
