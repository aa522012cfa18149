"""The docker-compose topology as real local processes: CeleryExecutor, Redis broker, PostgreSQL.

Starts ``airflow api-server``, ``scheduler``, ``dag-processor`` and two Celery workers (one on the
``default`` queue, one on the ``gpu`` queue, as in docker-compose.yaml) against a fresh metadata
database on the system PostgreSQL and a Redis database, creates the ``gpu`` pool, and drives
Airflow through its REST API v2 with a JWT from the simple auth manager.

    FT_DATABASE_URL=... FT_OBJECT_STORE_URL=... .venv/bin/python scripts/local_celery_stack.py \\
        --trigger catalog_tagging

The stack runs the CeleryExecutor, so its processes default to ``FT_MODE=distributed``: they need
``FT_DATABASE_URL`` and an ``s3://`` ``FT_OBJECT_STORE_URL``. Every process runs on this machine, so
``FT_MODE=local`` (what ``pipeline.settings_env`` passes for settings made outside Airflow, as
tests/test_celery_stack.py does) lets them share a ``file://`` store too.

Every process is started in its own session and stopped (by its process group id) on exit, and the
metadata database and the Redis database are dropped. tests/test_celery_stack.py uses this module.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379"
ADMIN_USER = "admin"
FINISHED_STATES = {"success", "failed"}
# A killed worker's task is noticed when its heartbeat stops: seconds instead of Airflow's default 300
# (``extra_env`` of a stack whose fault tests kill workers).
FAST_FAILURE_DETECTION = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
                          "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2"}
# Worker name, Celery queues, log-server port: the compose file's two workers.
WORKERS = (("default", "default"), ("gpu", "gpu"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCeleryStack:
    """Context manager: a running Airflow (Celery) stack in ``airflow_home``; ``api(...)`` talks REST."""

    def __init__(self, airflow_home: str | os.PathLike, *, redis_db: int = 7, gpu_pool_slots: int = 1,
                 use_schedules: bool = True, extra_env: dict | None = None, startup_timeout_s: float = 180):
        """``use_schedules=False``: only triggered runs (unpausing would otherwise start the latest cron run)."""
        self.home = Path(airflow_home)
        self.redis_db = redis_db
        self.gpu_pool_slots = gpu_pool_slots
        self.startup_timeout_s = startup_timeout_s
        self.use_schedules = use_schedules
        self.database = f"airflow_stack_{secrets.token_hex(4)}"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = self._environment(extra_env or {})
        self._token: str | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def _environment(self, extra_env: dict) -> dict:
        metadata_url = f"{SYSTEM_POSTGRES}/{self.database}"
        passwords = self.home / "simple_auth_manager_passwords.json"
        self.home.mkdir(parents=True, exist_ok=True)
        passwords.write_text(json.dumps({ADMIN_USER: self.password}))
        return {
            **os.environ, **extra_env,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": f"{REDIS}/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://postgres@127.0.0.1:5432/{self.database}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.use_schedules),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }

    def __enter__(self) -> "LocalCeleryStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._admin_sql(f'CREATE DATABASE "{self.database}"')
        self._flush_redis()
        self.airflow("db", "migrate")
        self.airflow("pools", "set", self.env.get("FT_GPU_POOL", "gpu"), str(self.gpu_pool_slots),
                     "GPU slots: tagging, training and evaluation")
        self._spawn("api-server", "api-server", "--port", str(self.port))
        self._spawn("scheduler", "scheduler")
        self._spawn("dag-processor", "dag-processor")
        for name, queues in WORKERS:
            self.start_worker(name, queues)
        self._wait_until(self._api_healthy, "the API server to answer")

    def start_worker(self, name: str, queues: str) -> None:
        """(Re)start the Celery worker ``worker-<name>`` consuming ``queues`` (a fresh process group)."""
        self._spawn(f"worker-{name}", "celery", "worker", "--queues", queues, "--concurrency", "1",
                    "--celery-hostname", f"{name}@%h",
                    env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (a worker and the task processes it forked), as the OOM killer would."""
        process = self.processes.pop(name)
        _signal_group(process, sig)
        process.wait(timeout=30)

    def stop(self) -> None:
        """Stop what we started (SIGTERM to each process group, SIGKILL after a grace period)."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
        self.processes.clear()
        self._flush_redis()
        try:
            self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except Exception as error:  # best effort: never hide the test's own failure
            print(f"could not drop {self.database}: {error}", file=sys.stderr)

    def airflow(self, *args: str, timeout: float = 300) -> str:
        completed = subprocess.run([_airflow_bin(), *args], env=self.env, capture_output=True, text=True,
                                   timeout=timeout)
        if completed.returncode:
            output = (completed.stdout + completed.stderr)[-3000:]
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{output}")
        return completed.stdout

    def _spawn(self, name: str, *args: str, env: dict | None = None) -> None:
        log_file = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 (kept open by the child)
        self.processes[name] = subprocess.Popen([_airflow_bin(), *args], env={**self.env, **(env or {})},
                                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _wait_until(self, predicate, what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.log_tail(dead[0])}")
            if predicate():
                return
            time.sleep(1)
        raise TimeoutError(f"timed out waiting for {what}")

    def _api_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _admin_sql(self, statement: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(f"{SYSTEM_POSTGRES}/postgres", isolation_level="AUTOCOMMIT",
                                  poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text(statement))
        engine.dispose()

    def _flush_redis(self) -> None:
        import redis

        redis.Redis.from_url(f"{REDIS}/{self.redis_db}").flushdb()

    # --- REST API v2 --------------------------------------------------------------------------

    def token(self) -> str:
        """A JWT from the simple auth manager (POST /auth/token with the admin's password)."""
        if self._token is None:
            body = self._request("POST", "/auth/token", {"username": ADMIN_USER, "password": self.password},
                                 authenticated=False)
            self._token = body["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._request(method, f"/api/v2{path}", body)

    def _request(self, method: str, path: str, body: dict | None, *, authenticated: bool = True) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if authenticated:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120) -> None:
        """Until the dag-processor has parsed and serialised ``dag_id``."""
        def parsed() -> bool:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return True
            except RuntimeError:
                return False

        self._wait_until(parsed, f"DAG {dag_id} to be parsed", timeout_s)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Unpause ``dag_id`` and trigger a run through the REST API; returns the run id."""
        self.wait_for_dag(dag_id)
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 600) -> dict:
        state: dict = {}

        def finished() -> bool:
            state.update(self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}"))
            return state.get("state") in FINISHED_STATES

        self._wait_until(finished, f"run {run_id} of {dag_id} to finish", timeout_s)
        return state

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        """A task's returned value (XCom ``return_value``) through the REST API."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return self.api("GET", f"{path}?map_index={map_index}&deserialize=true")["value"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]


def _airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group we created with start_new_session=True
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trigger", default="catalog_tagging", help="DAG id to trigger once the stack is up")
    parser.add_argument("--conf", default="{}", help="JSON conf for the run")
    parser.add_argument("--redis-db", type=int, default=7)
    parser.add_argument("--no-schedules", action="store_true", help="run only triggered DAG runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="airflow-celery-") as home, \
            LocalCeleryStack(home, redis_db=args.redis_db, use_schedules=not args.no_schedules) as stack:
        print(f"stack up at {stack.base_url} (metadata DB {stack.database})")
        started = time.perf_counter()
        run_id = stack.trigger(args.trigger, json.loads(args.conf))
        run = stack.wait_for_run(args.trigger, run_id)
        print(f"{args.trigger} {run_id}: {run['state']} in {time.perf_counter() - started:.1f}s")
        for ti in stack.task_instances(args.trigger, run_id):
            print(f"  {ti['task_id']:<20} map {ti['map_index']:>3} {ti['state']:<10} queue={ti['queue']} "
                  f"host={ti['hostname']}")


if __name__ == "__main__":
    main()
