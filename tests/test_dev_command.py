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


def _redis_running(data_dir: Path) -> bool:
    """Whether a redis-server working in ``data_dir/redis`` is alive. Read from /proc: the
    embedded Redis runs in the foreground (no pid file) and rewrites its command line to
    ``redis-server host:port``, but it changes into its ``--dir``, so its cwd identifies it."""
    redis_dir = (data_dir / "redis").resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
            if Path(os.readlink(entry / "cwd")) == redis_dir:
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def _graphql(url: str, token: str, query: str, **variables: object) -> dict:
    response = httpx.post(
        url,
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    body = response.json()
    assert not body.get("errors"), body
    return body["data"]


def _place_order_and_wait_for_invoice(url: str, token: str, deadline_s: float = 20) -> str:
    """placeOrder over HTTP, then poll ``Order.integrations`` until the worker and the sandbox
    partner have produced the invoice; returns the invoice number (externalRef)."""
    picks = _graphql(
        url,
        token,
        "{ customers(first: 1) { edges { node { id } } }"
        "  products(first: 1, filter: {active: true, inStock: true}) { edges { node { id } } } }",
    )
    customer = picks["customers"]["edges"][0]["node"]["id"]
    product = picks["products"]["edges"][0]["node"]["id"]
    placed = _graphql(
        url,
        token,
        "mutation($input: PlaceOrderInput!) { placeOrder(input: $input) {"
        "  order { number } errors { code message } } }",
        input={"customerId": customer, "lines": [{"productId": product, "quantity": 1}]},
    )["placeOrder"]
    assert placed["errors"] == [], placed
    number = placed["order"]["number"]
    query = (
        "query($number: String!) { orderByNumber(number: $number) {"
        "  integrations { kind status externalRef attempts lastError } } }"
    )
    started = time.monotonic()
    jobs: list[dict] = []
    while time.monotonic() - started < deadline_s:
        jobs = _graphql(url, token, query, number=number)["orderByNumber"]["integrations"]
        invoice = [job for job in jobs if job["kind"] == "INVOICE"]
        if invoice and invoice[0]["status"] == "SUCCEEDED" and invoice[0]["externalRef"]:
            return invoice[0]["externalRef"]
        time.sleep(0.2)
    raise AssertionError(f"no invoice for {number} within {deadline_s:.0f} s: {jobs}")


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
        assert _redis_running(data_dir), "the embedded Redis is not found by _redis_running"

        # Issue 4 item 6: on a fresh machine a placed order shows its invoice number within
        # seconds (outbox -> relay -> Redis stream -> worker -> sandbox partner).
        invoice_number = _place_order_and_wait_for_invoice(url, token)
        assert invoice_number.strip()
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert not _postgres_running(data_dir / "postgres"), output
    assert not _redis_running(data_dir), output

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
    assert not _redis_running(data_dir), output


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
