"""Nightly tagging under injected faults, through the real local Celery stack (issue 14's figures).

    .venv/bin/python benchmarks/fault_injection.py [--products 5000] [--home /tmp/ft-fault-injection]

Real parts: the compose topology as local processes (``scripts/local_celery_stack.py``: scheduler,
dag-processor, api-server, a ``default`` and a ``gpu`` Celery worker, Redis, metadata on the system
PostgreSQL), a catalog database on its own embedded PostgreSQL (durable, restartable on its port),
moto's S3 server behind the fault proxy of ``tests/s3_fault_proxy.py``, real catalog products and
photos, and a real model (Lite0 at 64 px trained here on a small slice: the pipeline's code paths,
not its accuracy). Runs are triggered over the REST API, as the scheduler would start them.

The products arrive in tranches, one per fault class; for each class the tranche's manifest is
put in the store and the nightly DAG runs (again while work is left, at most ``--max-runs``) while
the fault is injected:

* ``s3``: photo GETs answer 503 SlowDown, 500 InternalError, a connection reset or a truncated
  body, each with a probability, during the class's first run;
* ``postgres``: the catalog PostgreSQL is restarted (``fast``) and crashed (``immediate``) while a
  ``tag_batch`` is half-way through its range, then brought back on the same port;
* ``worker``: the ``gpu`` Celery worker's whole process group is SIGKILLed while a ``tag_batch`` is
  half-way through its range, then started again;
* ``photos``: the tranche's photos include every kind of the photo zoo (``tests/photo_zoo.py``);
* ``manifests``: beside the tranche's manifest, a manifest with a wrongly typed column, one
  missing a required column, a half-written one, a second manifest repeating some products, and
  deletions of some products.

Figures per class (``benchmarks/results/fault_injection.json``): faults injected, task retries
(Airflow try numbers), runs and their states, products tagged, products lost (must be 0),
duplicate rows (must be 0), errors recorded by stage and reason, and whether each run's recorded
status matches Airflow's; plus each photo-zoo kind's outcome.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from fashion_tagging import pipeline  # noqa: E402
from fashion_tagging.db import repository  # noqa: E402
from fashion_tagging.db.engine import (embedded_postgres_url, engine_for_url, ensure_database, migrate,  # noqa: E402
                                       running_port, stop_embedded_postgres)
from fashion_tagging.settings import get_settings  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fault_injection.json"
CLASSES = ("s3", "postgres", "worker", "photos", "manifests")
BUCKET = "fault-injection"
REDIS_DB = 12
S3_FAULTS = {"slowdown": 0.02, "internal": 0.02, "reset": 0.02, "truncate": 0.01}

log = logging.getLogger("fault_injection")


def load_stack_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_celery_stack", REPO / "scripts" / "local_celery_stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_product_ids(data_dir: Path, n: int) -> list[int]:
    """The first ``n`` real products (by id) that have a photo and a title."""
    styles = pd.read_csv(data_dir / "styles.csv", usecols=["id", "productDisplayName"], on_bad_lines="skip")
    styles = styles.dropna().sort_values("id")
    ids = [int(i) for i in styles["id"] if (data_dir / "images" / f"{int(i)}.jpg").is_file()]
    return ids[:n]


class MidBatch:
    """Waits for the moment to strike: a tag_batch of the run that has committed part of its range.

    After ``patience_s`` without one (ranges of a single chunk), any started, unfinished batch will do.
    """

    MID_RANGE = "done_seq > seq_from"
    STARTED = "attempts >= 1"

    def __init__(self, engine: sa.Engine, patience_s: float = 60):
        self.engine = engine
        self.patience_s = patience_s

    def wait(self, run_id: str, timeout_s: float = 300) -> tuple[int, str] | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            condition = self.MID_RANGE if time.monotonic() - started < self.patience_s else self.STARTED
            try:
                with self.engine.connect() as conn:
                    row = conn.execute(sa.text(
                        "SELECT batch_id FROM tagging_batches WHERE run_id = :r AND status = 'planned' "
                        f"AND {condition} LIMIT 1"), {"r": run_id}).first()
                if row:
                    return row.batch_id, "mid-range" if condition == self.MID_RANGE else "started"
            except sa.exc.OperationalError:
                pass
            time.sleep(0.3)
        return None


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.home = Path(args.home)
        self.data_dir = get_settings().data_dir
        self.stack_module = load_stack_module()
        self.faults: dict[str, dict] = {}

    # --- the world ------------------------------------------------------------------------------

    def start(self, stack_context) -> None:
        from moto.server import ThreadedMotoServer

        from fashion_tagging.objectstore import S3Store
        from tests.fixtures_services import DUMMY_AWS_ENV
        from tests.s3_fault_proxy import S3FaultProxy

        for name, value in DUMMY_AWS_ENV.items():
            os.environ.setdefault(name, value)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.pgdata = self.home / "catalog-pgdata"
        server_url = embedded_postgres_url(self.pgdata)
        self.port = running_port(self.pgdata)
        self.db_url = ensure_database(server_url, "catalog")
        self.engine = engine_for_url(self.db_url)
        migrate(self.engine)
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.proxy = S3FaultProxy(f"http://{host}:{port}", seed=7).start()
        self.store = S3Store(BUCKET, endpoint_url=self.proxy.url)
        self.store.client.create_bucket(Bucket=BUCKET)
        self.settings = get_settings(
            home=self.home / "worker-home", database_url=self.db_url, object_store_url=f"s3://{BUCKET}/",
            s3_endpoint_url=self.proxy.url, image_size=64, inference_batch_size=64,
            tagging_batch_size=self.args.chunk, tagging_task_min_products=1,
            tagging_max_tasks=self.args.tasks)
        self.version = self.register_model()
        env = {**pipeline.settings_env(self.settings), **self.stack_module.FAST_FAILURE_DETECTION, **DUMMY_AWS_ENV,
               "FT_MODE": "distributed"}
        self.stack = stack_context(self.home / "airflow", redis_db=REDIS_DB, use_schedules=False, extra_env=env)
        self.stack.__enter__()

    def stop(self) -> None:
        stack = getattr(self, "stack", None)
        if stack is not None:
            stack.__exit__(None, None, None)
        if getattr(self, "proxy", None):
            self.proxy.stop()
        if getattr(self, "moto", None):
            self.moto.stop()
        stop_embedded_postgres(self.pgdata)

    def register_model(self) -> str:
        """A real model artifact in the store, registered and promoted (the first night backfills it)."""
        from fashion_tagging.train import train
        from tests.fixtures_data import slice_ids, write_kaggle_slice

        if self.args.model:
            artifact = Path(self.args.model)
        else:
            slice_dir = write_kaggle_slice(self.home / "train-slice", slice_ids(), with_bad_rows=False)
            trained = train(get_settings(home=self.home / "train-home", data_dir=slice_dir, image_size=64, epochs=3,
                                         batch_size=32, inference_batch_size=64, vocabulary_size=5000),
                            progress=False)
            artifact = trained.artifact_dir
        config = json.loads((artifact / "config.json").read_text())
        key = f"{self.settings.models_prefix}{config['version']}"
        self.store.upload_dir(artifact, key)
        with self.engine.begin() as conn:
            repository.register_model(conn, config["version"], config["backbone"], config["image_size"], False,
                                      self.store.uri(key), article_type_accuracy=None)
            repository.promote_model(conn, config["version"])
        return config["version"]

    # --- one fault class ------------------------------------------------------------------------

    def arrive(self, name: str, ids: list[int]) -> None:
        from fashion_tagging.ingest import import_kaggle_catalog

        import_kaggle_catalog(self.data_dir, self.store, ids=ids, batch_name=f"night-{name}", settings=self.settings)

    def run_class(self, name: str, ids: list[int]) -> dict:
        started = time.perf_counter()
        self.proxy.clear()
        self.arrive(name, ids)
        prepared = getattr(self, f"prepare_{name}", lambda ids: {})(ids)
        injector = getattr(self, f"inject_{name}", None)
        runs = []
        for attempt in range(self.args.max_runs):
            run_id = self.stack.trigger("catalog_tagging")
            thread = None
            if injector is not None and attempt == 0:
                thread = threading.Thread(target=injector, args=(run_id,), daemon=True)
                thread.start()
            state = self.stack.wait_for_run("catalog_tagging", run_id, timeout_s=1800)["state"]
            if thread is not None:
                thread.join(timeout=600)
                self.proxy.clear()
            runs.append(self.describe_run(run_id, state))
            log.info("%s: run %d %s", name, attempt + 1, runs[-1])
            if self.untagged(ids, prepared.get("deleted", [])) == 0:
                break
        result = self.measure(name, ids, runs, prepared)
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result

    def describe_run(self, run_id: str, state: str) -> dict:
        task_instances = self.stack.task_instances("catalog_tagging", run_id)
        retries = sum(max(0, int(ti.get("try_number") or 0) - 1) for ti in task_instances)
        with self.engine.connect() as conn:
            recorded = conn.execute(sa.text("SELECT status, products_tagged, errors, batches FROM tagging_runs "
                                            "WHERE run_id = :r"), {"r": run_id}).first()
        return {"run_id": run_id, "airflow_state": state, "task_retries": retries,
                "recorded_status": recorded.status if recorded else None,
                "products_tagged": recorded.products_tagged if recorded else None,
                "errors": recorded.errors if recorded else None,
                "status_correct": bool(recorded) and recorded.status == state}

    def untagged(self, ids: list[int], deleted: list[int]) -> int:
        live = sorted(set(ids) - set(deleted))
        with self.engine.connect() as conn:
            tagged = conn.execute(sa.text("SELECT count(DISTINCT product_id) FROM tags WHERE product_id = ANY(:ids)"),
                                  {"ids": live}).scalar_one()
        return len(live) - tagged

    def measure(self, name: str, ids: list[int], runs: list[dict], prepared: dict) -> dict:
        deleted = prepared.get("deleted", [])
        live = sorted(set(ids) - set(deleted))
        with self.engine.connect() as conn:
            tagged = conn.execute(sa.text("SELECT count(DISTINCT product_id) FROM tags WHERE product_id = ANY(:ids)"),
                                  {"ids": live}).scalar_one()
            duplicates = {table: conn.execute(sa.text(
                f"SELECT count(*) - count(DISTINCT (product_id, model_version)) FROM {table}")).scalar_one()
                for table in ("tags", "embeddings")}
            repeated = prepared.get("repeated", [])
            later_manifest_won = conn.execute(sa.text(
                "SELECT count(*) FROM products WHERE product_id = ANY(:ids) AND title LIKE '%(v2)'"),
                {"ids": repeated}).scalar_one()
            deleted_still_tagged = conn.execute(sa.text(
                "SELECT count(*) FROM tags WHERE product_id = ANY(:ids)"), {"ids": deleted}).scalar_one()
            errors = conn.execute(sa.text(
                "SELECT stage, regexp_replace(reason, ' [(]its columns.*$', '') AS reason, count(*) AS n FROM product_errors "
                "WHERE run_id = ANY(:runs) OR source LIKE :night GROUP BY 1, 2 ORDER BY 3 DESC"),
                {"runs": [r["run_id"] for r in runs], "night": f"%night-{name}%"}).all()
        return {
            "products": len(ids), "deleted": len(deleted),
            "faults_injected": self.faults.get(name, {}),
            "runs": len(runs), "runs_succeeded": sum(r["airflow_state"] == "success" for r in runs),
            "run_states": [r["airflow_state"] for r in runs],
            "task_retries": sum(r["task_retries"] for r in runs),
            "products_tagged": int(tagged), "products_lost": len(live) - int(tagged),
            "deleted_products_still_tagged": int(deleted_still_tagged),
            "duplicate_rows": duplicates,
            "errors_recorded": [{"stage": s, "reason": r, "count": int(n)} for s, r, n in errors],
            "run_status_correct": all(r["status_correct"] for r in runs),
            "repeated_products": len(repeated), "repeated_products_with_the_later_manifests_values": int(later_manifest_won),
            "run_details": runs,
        }

    # --- the faults ---------------------------------------------------------------------------------

    def inject_s3(self, run_id: str) -> None:
        for kind, probability in S3_FAULTS.items():
            self.proxy.inject(kind, method="GET", key_pattern=r"images/", times=None, probability=probability)
        self.stack.wait_for_run("catalog_tagging", run_id, timeout_s=1800)
        self.faults["s3"] = dict(self.proxy.stats.faults)

    def _strike_mid_batch(self, name: str, run_id: str, times: int, strike) -> None:
        done = []
        mid = MidBatch(self.engine)
        for _ in range(times):
            moment = mid.wait(run_id, timeout_s=240)
            if moment is None:
                break
            done.append(f"{strike(len(done))} ({moment[1]} batch {moment[0]})")
            time.sleep(20)  # let Airflow notice and the retry resume before the next strike
        self.faults[name] = {"strikes": len(done), "kinds": done}

    def inject_postgres(self, run_id: str) -> None:
        def strike(i: int) -> str:
            mode = ("fast", "immediate")[i % 2]
            stop_embedded_postgres(self.pgdata, mode=mode, dispose_engines=False)
            time.sleep(5)
            embedded_postgres_url(self.pgdata, port=self.port)
            return f"restart-{mode}"

        self._strike_mid_batch("postgres", run_id, self.args.strikes, strike)

    def inject_worker(self, run_id: str) -> None:
        def strike(i: int) -> str:
            self.stack.kill("worker-gpu", signal.SIGKILL)
            time.sleep(2)
            self.stack.start_worker("gpu", "gpu")
            return "sigkill-gpu-worker"

        self._strike_mid_batch("worker", run_id, self.args.strikes, strike)

    def prepare_photos(self, ids: list[int]) -> dict:
        from tests.photo_zoo import write_photo_zoo

        zoo = write_photo_zoo(self.home / "zoo")
        placed = {}
        for product_id, photo in zip(ids, zoo, strict=False):
            self.store.put(f"{self.settings.images_prefix}{product_id}.jpg", photo.path.read_bytes())
            placed[product_id] = photo.kind
        self.faults["photos"] = {"bad_or_odd_photos": len(placed)}
        self._zoo = placed
        return {}

    def prepare_manifests(self, ids: list[int]) -> dict:
        """Bad manifests beside the night's own, named to sort after it (the latest key wins a product)."""
        prefix = self.settings.catalog_prefix
        frame = pd.read_csv(self.data_dir / "styles.csv", on_bad_lines="skip")
        frame = frame[frame["id"].isin(ids[:40])]
        bad = {}
        wrong_type = frame.head(10).astype({"year": str}).assign(year="not-a-year")
        self.store.put(f"{prefix}night-manifests.x1-wrong-type.csv", wrong_type.to_csv(index=False).encode())
        bad["wrong_type"] = 10
        missing = frame.head(10).drop(columns=["productDisplayName"])
        self.store.put(f"{prefix}night-manifests.x2-missing-column.csv", missing.to_csv(index=False).encode())
        bad["missing_column"] = 10
        buffer = io.BytesIO()
        frame.head(20).to_parquet(buffer, index=False)
        self.store.put(f"{prefix}night-manifests.x3-half-written.parquet", buffer.getvalue()[: len(buffer.getvalue()) // 2])
        bad["half_written"] = 20
        repeated = frame.iloc[20:40].assign(productDisplayName=lambda f: f["productDisplayName"] + " (v2)")
        self.store.put(f"{prefix}night-manifests.x4-repeat.csv", repeated.to_csv(index=False).encode())
        bad["repeated_products"] = 20
        deleted = ids[-10:]
        self.store.put(f"{prefix}night-manifests.x5-deletions.csv",
                       pd.DataFrame({"id": deleted, "deleted": True}).to_csv(index=False).encode())
        bad["deletions"] = len(deleted)
        self.faults["manifests"] = bad
        return {"deleted": deleted, "repeated": [int(i) for i in repeated["id"]]}

    def zoo_outcomes(self) -> list[dict]:
        placed = getattr(self, "_zoo", {})
        with self.engine.connect() as conn:
            tags = dict(conn.execute(sa.text("SELECT product_id, has_image FROM tags WHERE product_id = ANY(:ids)"),
                                     {"ids": list(placed)}).all())
            errors = {}
            for product_id, reason in conn.execute(sa.text(
                    "SELECT product_id, reason FROM product_errors WHERE product_id = ANY(:ids) ORDER BY id"),
                    {"ids": list(placed)}):
                errors.setdefault(product_id, reason)
        return [{"kind": kind, "product_id": product_id,
                 "outcome": ("tagged with its photo" if tags.get(product_id) else
                             "tagged from text, photo rejected" if product_id in tags else "NOT TAGGED"),
                 "reason": errors.get(product_id)} for product_id, kind in placed.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=5000, help="real products in all (split over the classes)")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    parser.add_argument("--home", default="/tmp/ft-fault-injection")
    parser.add_argument("--model", help="a model artifact directory (default: train a 64 px one on a slice)")
    parser.add_argument("--chunk", type=int, default=100, help="products per tagging transaction")
    parser.add_argument("--tasks", type=int, default=4, help="mapped tagging tasks per run")
    parser.add_argument("--strikes", type=int, default=3, help="postgres restarts / worker kills per class")
    parser.add_argument("--max-runs", type=int, default=4, help="runs per class until nothing is left")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("botocore", "werkzeug", "embedded_postgres", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    shutil.rmtree(args.home, ignore_errors=True)

    bench = Benchmark(args)
    ids = real_product_ids(bench.data_dir, args.products)
    per_class = len(ids) // len(args.classes)
    results: dict = {"products": len(ids), "classes": {}, "cpu_count": os.cpu_count(),
                     "host": socket.gethostname()}
    started = time.perf_counter()
    try:
        bench.start(bench.stack_module.LocalCeleryStack)
        for i, name in enumerate(args.classes):
            log.info("fault class %s: %d products", name, per_class)
            results["classes"][name] = bench.run_class(name, ids[i * per_class:(i + 1) * per_class])
        results["photo_zoo"] = bench.zoo_outcomes()
        results["store_retries_in_this_process"] = bench.store.retry_counts
    finally:
        results["seconds"] = round(time.perf_counter() - started, 1)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
        bench.stop()

    print("| fault class | faults injected | runs (succeeded) | task retries | tagged | lost | duplicate rows "
          "| status correct | errors recorded |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["classes"].items():
        errors = "; ".join(f"{e['stage']}: {e['reason']} x{e['count']}" for e in r["errors_recorded"][:4])
        print(f"| {name} | {r['faults_injected']} | {r['runs']} ({r['runs_succeeded']}) | {r['task_retries']} "
              f"| {r['products_tagged']} | {r['products_lost']} | {r['duplicate_rows']} | {r['run_status_correct']} "
              f"| {errors} |")
    print("\n| photo kind | outcome | reason |\n| --- | --- | --- |")
    for z in results.get("photo_zoo", []):
        print(f"| {z['kind']} | {z['outcome']} | {z['reason'] or ''} |")
    print(f"\nwrote {RESULTS} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
