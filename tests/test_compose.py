"""docker-compose.yml and the Dockerfile, checked without Docker: every command is a real
`quartermaster` sub-command with valid options, every QM_* variable exists, health checks hit
real endpoints, the API can be scaled, the image runs as non-root."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from quartermaster.cli import main
from quartermaster.config import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
QM_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def resolve(args: list[str]) -> click.Command:
    """The click command ``quartermaster <args>`` runs; its options are parsed for real."""
    assert args[0] == "quartermaster", args
    command: click.Command = main
    rest = args[1:]
    while isinstance(command, click.Group):
        assert rest, f"{args}: a group needs a sub-command"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"{args}: no sub-command {rest[0]!r}"
        command, rest = sub, rest[1:]
    # Raises click.UsageError / BadParameter on an unknown option or a bad value.
    command.make_context(args[-1], list(rest))
    return command


def health_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    return list(test[1:])


def test_the_stack_has_every_component() -> None:
    assert {"postgres-primary", "postgres-replica", "redis", "migrate", "api", "worker",
            "relay"} <= set(SERVICES)  # fmt: skip
    assert QM_SERVICES == ["api", "migrate", "relay", "worker"]
    assert SERVICES["postgres-primary"]["image"] == "postgres:16"
    assert SERVICES["postgres-replica"]["image"] == "postgres:16"


@pytest.mark.parametrize("name", QM_SERVICES)
def test_commands_are_real_quartermaster_commands(name: str) -> None:
    resolve(SERVICES[name]["command"])


def test_each_process_does_its_job() -> None:
    assert SERVICES["migrate"]["command"] == ["quartermaster", "migrate"]
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["api"]["command"][:2] == ["quartermaster", "serve"]
    assert "--no-relay" in SERVICES["worker"]["command"]
    assert "--only-relay" in SERVICES["relay"]["command"]
    for name in ("api", "worker", "relay"):
        needs = SERVICES[name]["depends_on"]
        assert needs["migrate"] == {"condition": "service_completed_successfully"}
        assert needs["redis"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", QM_SERVICES)
def test_every_qm_variable_exists(name: str) -> None:
    environment = SERVICES[name].get("environment", {})
    assert isinstance(environment, dict)
    unknown = [key for key in environment if key.startswith("QM_") and key not in ENV_VARS]
    assert unknown == []
    assert "QM_DATABASE_URL" in environment and "QM_REDIS_URL" in environment


def test_the_api_reads_from_the_replica() -> None:
    environment = SERVICES["api"]["environment"]
    assert "@postgres-replica:" in environment["QM_REPLICA_DATABASE_URL"]
    assert "@postgres-primary:" in environment["QM_DATABASE_URL"]
    assert {"QM_REPLICA_MAX_LAG_S", "QM_REPLICA_PROBE_S"} <= set(environment)


def test_health_checks_hit_real_endpoints() -> None:
    from quartermaster.app import create_app

    routes = {getattr(route, "path", None) for route in create_app(configure_logs=False).routes}
    api = health_command(SERVICES["api"])
    resolve(api)
    url = urlsplit(api[-1])
    assert url.path == "/health/ready" and url.path in routes
    assert url.port == 8000 and "8000" in SERVICES["api"]["command"]
    for name in ("worker", "relay"):
        check = health_command(SERVICES[name])
        resolve(check)
        url = urlsplit(check[-1])
        command = SERVICES[name]["command"]
        # The worker's Prometheus endpoint, on the port its command opens.
        assert url.path == "/metrics"
        assert command[command.index("--metrics-port") + 1] == str(url.port)
    for name in ("postgres-primary", "postgres-replica", "redis"):
        assert SERVICES[name]["healthcheck"]["test"]


def test_the_api_scales_without_host_port_conflicts() -> None:
    for mapping in SERVICES["api"].get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        assert container == "8000"
        assert re.fullmatch(r"\d+-\d+", host.rsplit(":", 1)[-1]), (
            f"{mapping}: a fixed host port breaks --scale api=N"
        )
    for name in ("api", "worker", "relay"):
        assert "container_name" not in SERVICES[name]


def test_redis_persists_its_streams() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_the_replica_is_cloned_with_its_slot() -> None:
    for name in ("postgres-primary", "postgres-replica"):
        for volume in SERVICES[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source
    init = (ROOT / "deploy/postgres/primary-init.sh").read_text()
    entry = (ROOT / "deploy/postgres/replica-entrypoint.sh").read_text()
    assert "pg_create_physical_replication_slot" in init and "REPLICATION" in init
    assert re.search(r"pg_basebackup[\s\S]*-R -X stream -S \"\$REPLICATION_SLOT\"", entry)
    slots = {SERVICES[n]["environment"]["REPLICATION_SLOT"] for n in
             ("postgres-primary", "postgres-replica")}  # fmt: skip
    assert len(slots) == 1
    assert SERVICES["postgres-replica"]["depends_on"]["postgres-primary"] == {
        "condition": "service_healthy"
    }


def _final_stage(dockerfile: str) -> list[str]:
    lines = [line.strip() for line in dockerfile.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert len(starts) >= 2, "multi-stage build expected"
    return lines[starts[-1] :]


def test_the_image_is_multi_stage_and_runs_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev" in dockerfile
    final = _final_stage(dockerfile)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert not any(line.startswith("COPY --from=ghcr.io/astral-sh/uv") for line in final)
    cmd = next(line for line in reversed(final) if line.upper().startswith("CMD "))
    import json

    resolve(json.loads(cmd[4:]))
