"""Project rules: schema export in sync, contract covered, import direction, config documented."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quartermaster.api import export_sdl
from quartermaster.config import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "quartermaster"
CONTRACT_CHECK = ROOT.parent / "shared" / "tools" / "contract_check.py"


def test_committed_schema_matches_the_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == export_sdl(), (
        "schema.graphql is stale: run `uv run quartermaster export-schema > schema.graphql`"
    )


def test_export_schema_command_prints_the_sdl() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quartermaster.cli", "export-schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == export_sdl()


@pytest.mark.skipif(not CONTRACT_CHECK.exists(), reason="shared contract checker not present")
def test_schema_covers_the_contract() -> None:
    result = subprocess.run(
        [sys.executable, str(CONTRACT_CHECK), str(ROOT / "schema.graphql")],
        capture_output=True,
        text=True,
    )
    assert "contract: 0 gap(s)" in result.stdout, result.stdout + result.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


FORBIDDEN = {
    # layer: prefixes it must never import
    "db": ("strawberry", "starlette", "quartermaster.schema", "quartermaster.resolvers",
           "quartermaster.services", "quartermaster.api", "quartermaster.http"),
    "services": ("strawberry", "starlette", "quartermaster.schema", "quartermaster.resolvers",
                 "quartermaster.api", "quartermaster.http"),
    "schema": ("quartermaster.resolvers", "quartermaster.api"),
    # Partner clients know nothing of the database or GraphQL; starlette: see the test below.
    "integrations": ("strawberry", "quartermaster.db", "quartermaster.services",
                     "quartermaster.schema", "quartermaster.resolvers", "quartermaster.api",
                     "quartermaster.http"),
    # Workers run without a web stack: no GraphQL, no Starlette.
    "workers": ("strawberry", "starlette", "quartermaster.schema", "quartermaster.resolvers",
                "quartermaster.api", "quartermaster.http", "quartermaster.app"),
}  # fmt: skip


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[layer]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_only_the_partner_sandbox_imports_starlette() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (PACKAGE / "integrations").rglob("*.py")
        if path.name != "sandbox.py"
        and any(n.startswith(("starlette", "uvicorn")) for n in _imports(path))
    ]
    assert offenders == []


def test_only_api_imports_resolvers() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if "resolvers" not in path.parts
        and path.name != "api.py"
        and any(n.startswith("quartermaster.resolvers") for n in _imports(path))
    ]
    assert offenders == []


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert missing == []
    read_in_code = set()
    for path in PACKAGE.rglob("*.py"):
        read_in_code.update(re.findall(r'"(QM_[A-Z0-9_]+)"', path.read_text()))
    for path in (ROOT / "tests").rglob("*.py"):
        read_in_code.update(re.findall(r'environ.get\("(QM_[A-Z0-9_]+)"', path.read_text()))
    assert read_in_code - set(ENV_VARS) == set()


# Built from pieces so that this file does not match itself.
MACHINE_PATH = re.compile("|".join(["/work/" + "main", "/ro" + "ot/", r"/home/\w+/"]))


def test_no_machine_paths_or_secrets_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".ini", ".yml", ".yaml", ".mjs", ".json"):
            continue
        if name.endswith("package-lock.json"):
            continue
        text = path.read_text(errors="ignore")
        if MACHINE_PATH.search(text) or "BEGIN PRIVATE" + " KEY" in text:
            offenders.append(name)
    assert offenders == []


def test_unknown_env_value_is_a_clear_error() -> None:
    env = {**os.environ, "QM_PORT": "eighty", "QM_DATABASE_URL": "postgresql://x@127.0.0.1/x"}
    result = subprocess.run(
        [sys.executable, "-m", "quartermaster.cli", "migrate"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0
    assert "QM_PORT must be an integer" in result.stderr
    assert "Traceback" not in result.stderr
