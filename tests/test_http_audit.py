"""The GraphQL-over-HTTP audit of the npm package graphql-http, against a real server.

Locally the audit is skipped when node or ``npm ci`` in tests/audit is missing; with
``QM_REQUIRE_AUDIT`` set (``.ci/run`` sets it) it fails instead, so CI cannot pass without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.servers import running_server

AUDIT_DIR = Path(__file__).parent / "audit"


def audit_required() -> bool:
    return os.environ.get("QM_REQUIRE_AUDIT", "").strip().lower() not in ("", "0", "false", "no")


def missing_for_audit(node: str | None) -> str | None:
    """Why the audit cannot run here, or None."""
    if node is None:
        return "`node` is not on PATH (install Node.js with npm)"
    if not (AUDIT_DIR / "node_modules" / "graphql-http").is_dir():
        return "tests/audit/node_modules/graphql-http is missing (run `npm ci` in tests/audit)"
    return None


def test_graphql_http_audit_reports_no_errors_or_warnings(
    database_url: str, redis_url: str
) -> None:
    node = shutil.which("node")
    missing = missing_for_audit(node)
    if missing is not None:
        if audit_required():
            pytest.fail(f"QM_REQUIRE_AUDIT is set but the graphql-http audit cannot run: {missing}")
        pytest.skip(f"{missing}; .ci/run installs what the audit needs")
    assert node is not None
    with running_server({"QM_DATABASE_URL": database_url, "QM_REDIS_URL": redis_url}) as base:
        result = subprocess.run(
            [node, "audit.mjs", f"{base}/graphql"],
            cwd=AUDIT_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"the audit printed nothing (exit {result.returncode}):\n{result.stderr}"
    summary = lines[-1]
    not_ok = [line for line in lines[:-1] if line["status"] != "ok"]
    assert summary["total"] >= 50, result.stdout + result.stderr
    assert not_ok == [], not_ok
    assert result.returncode == 0
