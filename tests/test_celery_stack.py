"""The compose topology as real processes: the nightly DAG triggered over REST runs on Celery workers.

scheduler + dag-processor + api-server + a ``default`` and a ``gpu`` Celery worker, metadata in a
fresh database of the system PostgreSQL, Redis as the broker (see scripts/local_celery_stack.py).
The catalog side: embedded PostgreSQL with the session's tiny real model registered and promoted
(not serving yet: the run backfills it and its ``finish`` activates it), and a local object store
holding the slice's manifest and photos.
"""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest
import sqlalchemy as sa

from fashion_tagging import pipeline
from fashion_tagging.db import repository
from fashion_tagging.db.engine import engine_for_url
from fashion_tagging.objectstore import LocalStore
from fashion_tagging.settings import PROJECT_ROOT
from tests.fixtures_model import tiny_settings
from tests.fixtures_services import drop_database, new_database

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("local_celery_stack", PROJECT_ROOT / "scripts" / "local_celery_stack.py")
local_celery_stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_celery_stack)

REDIS_DB = 11


def _reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def catalog(postgres_url, tmp_path, kaggle_slice_dir, tiny_artifact, ft_home):
    """A catalog DB whose promoted model is the tiny artifact, and a store with the slice to ingest."""
    from fashion_tagging.ingest import import_kaggle_catalog

    if not (_reachable(5432) and _reachable(6379)):
        pytest.skip("needs the system PostgreSQL (5432) and Redis (6379)")
    db_url = new_database(postgres_url, prefix="celery")
    store = LocalStore(tmp_path / "store")
    import_kaggle_catalog(kaggle_slice_dir, store)
    config = json.loads((tiny_artifact / "config.json").read_text())
    engine = engine_for_url(db_url)
    with engine.begin() as conn:
        repository.register_model(conn, config["version"], config["backbone"], config["image_size"], False,
                                  tiny_artifact.as_uri(), article_type_accuracy=None)
        repository.promote_model(conn, config["version"])
    settings = tiny_settings(ft_home, kaggle_slice_dir, database_url=db_url, object_store_url=store.url,
                             tagging_batch_size=150, tagging_task_min_products=1)  # ~300 products: 2 mapped batches
    yield settings, engine, config["version"]
    drop_database(postgres_url, db_url)


def test_nightly_dag_over_rest_on_celery_workers(catalog, tmp_path):
    settings, engine, version = catalog
    assert repository.serving_model(engine) is None  # promoted: readers wait for its backfill
    with local_celery_stack.LocalCeleryStack(tmp_path / "airflow", redis_db=REDIS_DB, use_schedules=False,
                                             extra_env=pipeline.settings_env(settings)) as stack:
        run_id = stack.trigger("catalog_tagging")
        run = stack.wait_for_run("catalog_tagging", run_id, timeout_s=480)
        task_instances = stack.task_instances("catalog_tagging", run_id)
        summary = stack.xcom("catalog_tagging", run_id, "finish")
        logs = {name: stack.log_tail(name, 4000) for name in ("worker-gpu", "worker-default", "scheduler")}
    assert run["state"] == "success", (task_instances, logs)
    assert run["run_type"] == "manual"

    by_task = {}
    for ti in task_instances:
        by_task.setdefault(ti["task_id"], []).append(ti)
    batches = by_task["tag_batch"]
    assert len(batches) == summary["batches"] >= 2, summary
    assert summary["status"] == "success" and summary["more_work"] is False, summary
    assert all(ti["state"] == "success" for ti in batches)
    # Only the gpu worker consumes the gpu queue, so these ran there, one at a time through the pool.
    assert {(ti["queue"], ti["pool"]) for ti in batches} == {("gpu", "gpu")}
    assert {ti["queue"] for ti in by_task["discover"] + by_task["plan"] + by_task["finish"]} == {"default"}
    # the whole backlog fitted in one run: nothing to continue
    assert [ti["state"] for ti in by_task["continue_backlog"]] == ["skipped"]

    with engine.connect() as conn:
        products = conn.execute(sa.text("SELECT count(*) FROM products")).scalar_one()
        tags = conn.execute(sa.text("SELECT count(*) FROM tags")).scalar_one()
        run_row = conn.execute(sa.text("SELECT status, products_tagged, batches FROM tagging_runs "
                                       "WHERE run_id = :r"), {"r": run_id}).one()
    assert products > 0 and tags == products == summary["products_tagged"]
    assert run_row == ("success", products, len(batches))
    # it tagged the whole catalog, so finish made it the serving model
    assert repository.serving_model(engine)["version"] == version


def test_a_worker_killed_mid_batch_is_retried_and_nothing_is_lost(catalog, tmp_path):
    """SIGKILL the gpu worker's whole process group once a tag_batch has committed part of its range.

    Airflow notices the dead task by its missing heartbeat, retries it on the restarted worker, and
    the retry resumes after the last committed chunk: the run succeeds with every product tagged
    exactly once and the run's counts right.
    """
    import time

    settings, engine, version = catalog
    settings = settings.replace(tagging_batch_size=10, tagging_task_min_products=1, tagging_max_tasks=1)  # one range, many commits
    with local_celery_stack.LocalCeleryStack(tmp_path / "airflow", redis_db=REDIS_DB, use_schedules=False,
                                             extra_env={**pipeline.settings_env(settings),
                                                        **local_celery_stack.FAST_FAILURE_DETECTION}) as stack:
        run_id = stack.trigger("catalog_tagging")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a range that has committed some chunks but not all
            with engine.connect() as conn:
                partly_done = conn.execute(sa.text(
                    "SELECT batch_id FROM tagging_batches WHERE run_id = :r AND status = 'planned' "
                    "AND done_seq > seq_from"), {"r": run_id}).first()
            if partly_done:
                break
            time.sleep(0.2)
        assert partly_done, stack.log_tail("worker-gpu")
        stack.kill("worker-gpu")
        with engine.connect() as conn:
            committed_before_kill = conn.execute(sa.text("SELECT tagged FROM tagging_batches WHERE batch_id = :b"),
                                                 {"b": partly_done.batch_id}).scalar_one()
        stack.start_worker("gpu", "gpu")
        run = stack.wait_for_run("catalog_tagging", run_id, timeout_s=480)
        task_instances = stack.task_instances("catalog_tagging", run_id)
        logs = {name: stack.log_tail(name, 4000) for name in ("worker-gpu", "scheduler")}
    assert run["state"] == "success", (task_instances, logs)
    (killed,) = [ti for ti in task_instances if ti["task_id"] == "tag_batch"]
    assert killed["state"] == "success" and killed["try_number"] >= 2, killed

    with engine.connect() as conn:
        products = conn.execute(sa.text("SELECT count(*) FROM products")).scalar_one()
        tags, distinct = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT (product_id, model_version)) FROM tags")).one()
        batch = conn.execute(sa.text("SELECT status, attempts, tagged, errors FROM tagging_batches "
                                     "WHERE batch_id = :b"), {"b": partly_done.batch_id}).one()
        run_row = conn.execute(sa.text("SELECT status, products_tagged FROM tagging_runs WHERE run_id = :r"),
                               {"r": run_id}).one()
    assert 0 < committed_before_kill < products
    assert tags == distinct == products  # nothing lost, nothing twice
    assert batch.status == "done" and batch.attempts >= 2 and batch.tagged == products
    assert tuple(run_row) == ("success", products)
    assert repository.serving_model(engine)["version"] == version
