"""`quartermaster dev` on a machine with nothing running: embedded servers, seed once, Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Where ``dev`` keeps its servers' data. Not under tmp_path: as root the servers run as
    another user, who must traverse every folder above their data, and every new pytest
    session (another one running at the same time, say) resets /tmp/pytest-of-root to 0700."""
    path = ROOT / ".qm-data" / "dev-tests" / uuid.uuid4().hex[:10]
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(data_dir: Path, port: int, *options: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env.update({"QM_DATA_DIR": str(data_dir), "QM_LOG_LEVEL": "warning"})
    return subprocess.Popen(
        [sys.executable, "-m", "quartermaster.cli", "dev", "--port", str(port), *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_url(process: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"(http://127\.0\.0\.1:\d+/graphql)", line)
        if match:
            return match.group(1), "".join(seen)
    raise AssertionError("dev did not print its URL:\n" + "".join(seen))


def _read_token(process: subprocess.Popen[str]) -> str:
    """The first bearer token dev prints after its address (the STAFF one)."""
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"Bearer ([\w.-]+)", process.stdout.readline())
        if match:
            return match.group(1)
    raise AssertionError("dev printed no token")


def _stop(process: subprocess.Popen[str], signum: int = signal.SIGINT) -> str:
    process.send_signal(signum)
    out, _ = process.communicate(timeout=30)
    return out


def _postgres_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dev_starts_everything_seeds_once_and_stops_on_ctrl_c(data_dir: Path) -> None:
    port = free_port()
    process = _start(data_dir, port)
    try:
        url, output = _wait_for_url(process)
        assert url == f"http://127.0.0.1:{port}/graphql"
        assert "seeding" in output
        query = (
            "{ orders(first: 2) { totalCount edges { node { number } } } products { totalCount } }"
        )
        token = _read_token(process)
        # The address is printed once the socket listens: the first request must succeed.
        anonymous = httpx.post(url, json={"query": query}, timeout=5).json()
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        response = httpx.post(
            url, json={"query": query}, headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        data = response.json()["data"]
        assert data["orders"]["totalCount"] == 5000
        assert data["products"]["totalCount"] == 2000
        graphiql = httpx.get(url, headers={"accept": "text/html"}, timeout=5)
        assert "graphiql" in graphiql.text.lower()
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert not _postgres_running(data_dir / "postgres"), output

    # A second start keeps the data and does not seed again; a stop signal right after the
    # address is printed (SIGTERM this time, as a process manager sends) still stops cleanly.
    process = _start(data_dir, port)
    try:
        _, output = _wait_for_url(process)
        assert "seeding" not in output
    finally:
        output += _stop(process, signal.SIGTERM)
    assert process.returncode == 0, output
    assert "stopped." in output
    assert not _postgres_running(data_dir / "postgres"), output


def _statements(metrics: str, database: str) -> float:
    match = re.search(rf'^qm_sql_statements_total{{database="{database}"}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def test_dev_replica_reads_from_the_streaming_replica_and_ctrl_c_stops_both(
    data_dir: Path,
) -> None:
    servers = [data_dir / "replicated" / "primary", data_dir / "replicated" / "replica"]
    port = free_port()
    process = _start(data_dir, port, "--replica")
    try:
        url, output = _wait_for_url(process)
        assert "primary + streaming replica" in output
        token = _read_token(process)
        base = f"http://127.0.0.1:{port}"
        assert all(_postgres_running(pgdata) for pgdata in servers), output

        ready = httpx.get(f"{base}/health/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ok", body
        assert body["checks"]["replica"] == "ok"
        assert body["reads"]["target"] == "replica"
        assert body["reads"]["replicaHealthy"] is True

        # A query reads the seeded data from the replica.
        before = httpx.get(f"{base}/metrics", timeout=5).text
        response = httpx.post(
            url,
            json={"query": "{ products { totalCount } }"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert response.json()["data"]["products"]["totalCount"] == 2000
        after = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'qm_reads_target{database="replica"} 1.0' in after
        # (Not "none on the primary": /metrics itself may run SQL there every 5 s.)
        assert _statements(after, "replica") > _statements(before, "replica")
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert "stopped." in output
    assert not any(_postgres_running(pgdata) for pgdata in servers), output
