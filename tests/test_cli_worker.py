"""`quartermaster worker` refuses, with a one-line error, unsigned partner calls in production."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from quartermaster.cli import main

PRODUCTION = {
    "QM_ENV": "production",
    "QM_AUTH_SECRET": "p" * 48,
    "QM_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
    "QM_REDIS_URL": "redis://127.0.0.1:9/0",
    "QM_INVOICING_URL": "http://127.0.0.1:9/",
}


@pytest.mark.parametrize("secret", [None, "dev"])
def test_production_worker_refuses_a_partner_without_its_own_secret(secret: str | None) -> None:
    from quartermaster.integrations.signing import DEV_SIGNING_SECRET

    env = dict(PRODUCTION)
    if secret == "dev":
        env["QM_INVOICING_SIGNING_SECRET"] = DEV_SIGNING_SECRET
    result = CliRunner().invoke(main, ["worker"], env=env)
    assert result.exit_code == 1
    assert "QM_INVOICING_SIGNING_SECRET" in result.output
    assert "Traceback" not in result.output
