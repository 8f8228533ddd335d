"""``QM_DB_PLAN_CACHE_MODE`` and the worker's generic plans reach PostgreSQL's sessions."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import text

from quartermaster.config import DatabaseSettings
from quartermaster.db.engine import WRITER_SERVER_SETTINGS, Database
from quartermaster.workers.runner import WORKER_SERVER_SETTINGS


async def _mode(settings: DatabaseSettings, **extra: dict[str, str]) -> str:
    db = Database.connect(settings, **extra)
    try:
        async with db.reader("primary").connect() as conn:
            return str((await conn.execute(text("SHOW plan_cache_mode"))).scalar_one())
    finally:
        await db.dispose()


async def test_connections_get_the_configured_plan_cache_mode(database_url: str) -> None:
    base = DatabaseSettings(url=database_url, replica_url=None, pool_size=1)
    assert await _mode(base) == "auto"  # the server's default
    assert await _mode(base, server_settings=WORKER_SERVER_SETTINGS) == "force_generic_plan"
    custom = dataclasses.replace(base, plan_cache_mode="force_custom_plan")
    assert await _mode(custom) == "force_custom_plan"


async def _modes(settings: DatabaseSettings) -> tuple[str, str]:
    """(reads, units of work) of a Database built as the API builds it."""
    db = Database.connect(settings, writer_settings=WRITER_SERVER_SETTINGS)
    show = text("SHOW plan_cache_mode")
    try:
        async with db.reader("primary").connect() as conn:
            reads = str((await conn.execute(show)).scalar_one())
        async with db.units_of_work.connect() as conn, conn.begin():
            writes = str((await conn.execute(show)).scalar_one())
        return reads, writes
    finally:
        await db.dispose()


async def test_api_units_of_work_use_generic_plans_and_reads_the_servers_choice(
    database_url: str,
) -> None:
    base = DatabaseSettings(url=database_url, replica_url=None, pool_size=1)
    assert await _modes(base) == ("auto", "force_generic_plan")
    # QM_DB_PLAN_CACHE_MODE is the operator's choice for every connection, writes included
    custom = dataclasses.replace(base, plan_cache_mode="force_custom_plan")
    assert await _modes(custom) == ("force_custom_plan", "force_custom_plan")


def test_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_DB_PLAN_CACHE_MODE", "force_generic_plan")
    assert DatabaseSettings.from_env().plan_cache_mode == "force_generic_plan"
    monkeypatch.setenv("QM_DB_PLAN_CACHE_MODE", "always")
    with pytest.raises(ValueError, match="QM_DB_PLAN_CACHE_MODE must be one of"):
        DatabaseSettings.from_env()
    monkeypatch.delenv("QM_DB_PLAN_CACHE_MODE")
    assert DatabaseSettings.from_env().plan_cache_mode is None
