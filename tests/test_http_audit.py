"""The GraphQL-over-HTTP audit of the npm package graphql-http, against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.servers import running_server

AUDIT_DIR = Path(__file__).parent / "audit"


def test_graphql_http_audit_reports_no_errors_or_warnings(
    database_url: str, redis_url: str
) -> None:
    node = shutil.which("node")
    if node is None or not (AUDIT_DIR / "node_modules" / "graphql-http").is_dir():
        pytest.skip("needs node and `npm ci` in tests/audit (.ci/run does both)")
    with running_server({"QM_DATABASE_URL": database_url, "QM_REDIS_URL": redis_url}) as base:
        result = subprocess.run(
            [node, "audit.mjs", f"{base}/graphql"],
            cwd=AUDIT_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1]
    not_ok = [line for line in lines[:-1] if line["status"] != "ok"]
    assert summary["total"] >= 50, result.stdout + result.stderr
    assert not_ok == [], not_ok
    assert result.returncode == 0
