"""The steps the Airflow DAGs run, free of Airflow so the CLI and tests call the very same code.

Every step takes plain JSON-able arguments and returns a JSON-able dict (it travels as an XCom).
Anything a later step needs on another worker (training snapshot, model artifact) goes through
the object store, never a local path: Celery may run consecutive tasks on different machines.
Module-level imports stay light because the DAG files import the asset names from here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fashion_tagging.settings import HEADS, PRIMARY_HEAD, PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

# Assets shared by the DAGs: the tagging DAG produces the first and is scheduled on the second.
CATALOG_TAGS_ASSET = {"name": "catalog_tags", "uri": "fashion_tagging://catalog/tags"}
MODEL_PROMOTED_ASSET = {"name": "model_promoted", "uri": "fashion_tagging://models/promoted"}

# A mapped task costs seconds of scheduling overhead, so batches are never tiny.
MIN_BATCH_SIZE = 100
MAX_BATCH_SIZE = 5000
SNAPSHOTS_PREFIX = "snapshots/"


# --- shared helpers ----------------------------------------------------------------------------


def catalog_engine(settings: Settings):
    """The catalog engine, migrated to head (imported lazily: DAG files import this module)."""
    from fashion_tagging.db.engine import migrate_database

    return migrate_database(settings)


def object_store(settings: Settings):
    """The configured object store (catalog manifests, photos, snapshots, model artifacts)."""
    from fashion_tagging.objectstore import open_store

    return open_store(settings.resolved_object_store_url, endpoint_url=settings.s3_endpoint_url,
                      max_concurrency=settings.s3_max_concurrency)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# --- nightly tagging ---------------------------------------------------------------------------


def ingest_new_manifests(settings: Settings, run_id: str) -> dict:
    """Upsert the products of manifests new or rewritten since the last ingest (the manifest ledger).

    Bad rows are recorded under ``run_id``.
    """
    from fashion_tagging.ingest import load_catalog_into_db

    with catalog_engine(settings).begin() as conn:
        sync = load_catalog_into_db(conn, object_store(settings), prefix=settings.catalog_prefix, run_id=run_id)
    return {"manifests": sync.manifest_keys, "products_read": sync.products_read,
            "products_written": sync.products_written, "row_errors": len(sync.errors)}


def discover_new_products(settings: Settings, run_id: str | None = None) -> dict:
    """Ingest new manifests, then list the products the production model has not tagged yet.

    Opens the run in ``tagging_runs``; a run with nothing to tag is closed here and then, since the
    DAG skips the rest, its row says so.
    """
    from fashion_tagging.db import repository

    run_id = run_id or f"manual__{_now_iso()}"
    started_at = _now_iso()
    ingested = ingest_new_manifests(settings, run_id)
    with catalog_engine(settings).begin() as conn:
        production = repository.production_model(conn)
        version = production["version"] if production else None
        product_ids = repository.products_needing_tags(conn, version) if version else []
        repository.start_run(conn, run_id, model_version=version, details={"ingested": ingested})
        if not product_ids:
            reason = "no production model yet" if version is None else "nothing new to tag"
            repository.finish_run(conn, run_id, details={"ingested": ingested, "nothing_to_do": reason})
    log.info("discover: ingested %s; model %s; %d products to tag", ingested, version, len(product_ids))
    return {"run_id": run_id, "model_version": version, "product_ids": [int(i) for i in product_ids],
            "ingested": ingested, "started_at": started_at}


def plan_batches(product_ids: list[int], batch_size: int) -> list[list[int]]:
    """Equal-sized batches of ``batch_size`` (clamped to hundreds..thousands), ids sorted and unique."""
    ids = sorted({int(i) for i in product_ids})
    if not ids:
        return []
    size = min(max(int(batch_size), MIN_BATCH_SIZE), MAX_BATCH_SIZE)
    count = math.ceil(len(ids) / size)
    per_batch = math.ceil(len(ids) / count)
    return [ids[start:start + per_batch] for start in range(0, len(ids), per_batch)]


def summarize_run(run_id: str, batch_results: list[dict], *, started_at: str | None = None) -> dict:
    """Totals over the batch results of one run: counts, errors and throughput (wall clock since start)."""
    batch_results = [r for r in batch_results if r]
    tagged = sum(int(r["tagged"]) for r in batch_results)
    wall = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(started_at)).total_seconds() if started_at else None
    busy = sum(float(r["total_seconds"]) for r in batch_results)
    return {
        "run_id": run_id,
        "model_version": batch_results[0]["model_version"] if batch_results else None,
        "batches": len(batch_results),
        "products_seen": sum(int(r["requested"]) for r in batch_results),
        "products_tagged": tagged,
        "text_only": sum(int(r["text_only"]) for r in batch_results),
        "errors": sum(int(r["errors"]) for r in batch_results),
        "seconds": None if wall is None else round(wall, 2),
        "batch_seconds": round(busy, 2),
        "products_per_second": round(tagged / wall, 1) if wall else None,
        "products_per_batch_second": round(tagged / busy, 1) if busy else None,
    }


def record_run(settings: Settings, summary: dict) -> None:
    """Close the run in ``tagging_runs`` with its totals (a cleared and re-run summary overwrites)."""
    from fashion_tagging.db import repository

    with catalog_engine(settings).begin() as conn:
        repository.finish_run(conn, summary["run_id"], products_seen=summary["products_seen"],
                              products_tagged=summary["products_tagged"], errors=summary["errors"],
                              batches=summary["batches"], seconds=summary["seconds"], details=summary)


# --- retraining --------------------------------------------------------------------------------


def snapshot_training_data(settings: Settings) -> dict:
    """Freeze the labelled catalog (rows with a split) into a Parquet object in the store."""
    import io

    import pandas as pd
    import sqlalchemy as sa

    from fashion_tagging.db.repository import PRODUCT_COLUMN_MAP
    from fashion_tagging.db.schema import products

    snapshot_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    ingested = ingest_new_manifests(settings, f"snapshot-{snapshot_id}")
    engine = catalog_engine(settings)
    columns = [products.c[name].label(alias) for alias, name in PRODUCT_COLUMN_MAP.items() if alias != "source"]
    query = sa.select(*columns).where(products.c.split.is_not(None)).order_by(products.c.product_id)
    with engine.connect() as conn:
        frame = pd.read_sql(query, conn)
    if frame.empty:
        raise ValueError("no labelled products in the catalog database: ingest the reference catalog first")
    key = f"{SNAPSHOTS_PREFIX}{snapshot_id}.parquet"
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    object_store(settings).put(key, buffer.getvalue())
    splits = {str(k): int(v) for k, v in frame["split"].value_counts().items()}
    log.info("snapshot %s: %d labelled products %s", key, len(frame), splits)
    return {"snapshot_key": key, "products": len(frame), "splits": splits, "ingested": ingested}


def load_snapshot(settings: Settings, snapshot: dict, splits: tuple[str, ...], *, backbone: str, image_size: int,
                  need_all_images: bool, need_top_inputs: bool = False):
    """The snapshot's rows in ``splits`` as the catalog frame train/evaluate expect, with local image files.

    Images whose embedding is already cached for (backbone, image size) are not downloaded: the
    frozen backbone's output for them cannot have changed.
    """
    import io

    import pandas as pd

    from fashion_tagging.catalog import clean_html, product_text

    frame = pd.read_parquet(io.BytesIO(object_store(settings).get(snapshot["snapshot_key"])))
    frame = frame[frame["split"].isin(splits)].reset_index(drop=True)
    for head in HEADS:
        frame[head] = frame[head].fillna("").astype(str).str.strip()
    frame["description"] = frame["description"].map(clean_html)
    frame["text"] = [product_text(t, d) for t, d in zip(frame["productDisplayName"], frame["description"], strict=True)]
    frame["image_path"] = materialize_images(settings, frame, backbone=backbone, image_size=image_size,
                                             need_all_images=need_all_images, need_top_inputs=need_top_inputs)
    return frame


def materialize_images(settings: Settings, frame, *, backbone: str, image_size: int, need_all_images: bool,
                       need_top_inputs: bool = False) -> list:
    """Local paths of the products' images, downloading only those not already on disk or cached.

    ``need_top_inputs``: a cache without the last block's activations does not count (it is rebuilt).
    """
    from fashion_tagging.features import cached_product_ids

    cached_ids: set[int] = set() if need_all_images else cached_product_ids(
        settings.cache_dir, backbone, image_size, with_top_inputs=need_top_inputs)
    image_dir = settings.cache_dir / "images"
    paths, to_fetch = [], {}
    for pid, key in zip(frame["id"], frame["image_key"], strict=True):
        if not isinstance(key, str) or not key:  # no photo (None, or NaN after a DataFrame round trip)
            paths.append(None)
            continue
        path = image_dir / key
        paths.append(str(path))
        if int(pid) not in cached_ids and not path.is_file():
            to_fetch[key] = path
    if to_fetch:
        log.info("downloading %d product images (%d embeddings cached)", len(to_fetch), len(cached_ids))
        for key, data in object_store(settings).get_many(to_fetch).items():
            if isinstance(data, Exception):
                log.warning("image %s unavailable: %s", key, data)  # embedding step records it per product
                continue
            to_fetch[key].parent.mkdir(parents=True, exist_ok=True)
            to_fetch[key].write_bytes(data)
    return paths


def candidate_settings(settings: Settings, params: dict) -> Settings:
    """Settings with the run's params (backbone, image size, epochs) applied."""
    overrides = {name: params[name] for name in ("backbone", "image_size", "epochs") if params.get(name) is not None}
    return dataclasses.replace(settings, **overrides)


def train_model(settings: Settings, params: dict, snapshot: dict) -> dict:
    """Train a candidate on the snapshot's train/val splits; its artifact goes to the object store."""
    from fashion_tagging.train import fine_tune_mode, train

    settings = candidate_settings(settings, params)
    mode = fine_tune_mode(params["fine_tune"] if params.get("fine_tune") is not None else settings.fine_tune)
    frame = load_snapshot(settings, snapshot, ("train", "val"), backbone=settings.backbone,
                          image_size=settings.image_size, need_all_images=mode == "full",
                          need_top_inputs=mode == "top")
    result = train(settings, products=frame, epochs=settings.epochs, progress=False, fine_tune=mode)
    artifact_uri = publish_artifact(settings, result.artifact_dir)
    config = json.loads((Path(result.artifact_dir) / "config.json").read_text())
    return {"version": result.version, "artifact_uri": artifact_uri, "backbone": config["backbone"],
            "image_size": int(config["image_size"]), "fine_tuned": bool(config.get("fine_tuned", False)),
            "epochs_run": config.get("epochs_run"), "timings": result.timings,
            "best_val_article_type_accuracy": config.get("best_val_article_type_accuracy")}


def evaluate_model(settings: Settings, trained: dict, snapshot: dict, *, split: str = "test") -> dict:
    """Evaluate the candidate on the snapshot's fixed test split; the full report joins the artifact."""
    from fashion_tagging.evaluate import evaluate

    artifact_dir = fetch_artifact(settings, trained["version"], trained["artifact_uri"])
    frame = load_snapshot(settings, snapshot, (split,), backbone=trained["backbone"],
                          image_size=trained["image_size"], need_all_images=trained["fine_tuned"])
    report = evaluate(artifact_dir, settings, split=split, products=frame, progress=False)
    publish_artifact(settings, artifact_dir)
    fused = report["modes"]["fused"]
    return {
        "version": trained["version"], "split": split, "products": report["products"],
        "article_type_accuracy": report["article_type_accuracy"],
        "article_type_macro_f1": fused[PRIMARY_HEAD]["macro_f1"],
        "image_only_accuracy": report["modes"]["image_only"][PRIMARY_HEAD]["accuracy"],
        "text_only_accuracy": report["modes"]["text_only"][PRIMARY_HEAD]["accuracy"],
        "head_accuracy": {head: scores["accuracy"] for head, scores in fused.items()},
    }


def production_metrics(settings: Settings) -> dict | None:
    """Version and test accuracy of the production model, None when there is none yet."""
    from fashion_tagging.db import repository

    with catalog_engine(settings).connect() as conn:
        production = repository.production_model(conn)
    if not production:
        return None
    return {"version": production["version"], "article_type_accuracy": production["article_type_accuracy"]}


def gate(candidate_metrics: dict, production_metrics: dict | None, baseline: float) -> dict:
    """Promote only if articleType accuracy >= baseline AND not worse than the production model."""
    candidate = float(candidate_metrics["article_type_accuracy"])
    production = production_metrics.get("article_type_accuracy") if production_metrics else None
    figures = {"candidate_version": candidate_metrics.get("version"), "candidate_accuracy": candidate,
               "baseline": float(baseline), "production_version": (production_metrics or {}).get("version"),
               "production_accuracy": None if production is None else float(production)}
    if candidate < baseline:
        reason = f"articleType accuracy {candidate:.4f} is below the baseline {baseline:.4f}"
        return {"promote": False, "reason": reason, **figures}
    if production is not None and candidate < float(production):
        reason = (f"articleType accuracy {candidate:.4f} is worse than production "
                  f"{figures['production_version']} ({float(production):.4f})")
        return {"promote": False, "reason": reason, **figures}
    versus = "no production model yet" if production is None else f"production {float(production):.4f}"
    reason = f"articleType accuracy {candidate:.4f} >= baseline {baseline:.4f} and {versus}"
    return {"promote": True, "reason": reason, **figures}


def register_and_promote(settings: Settings, trained: dict, evaluation: dict, decision: dict) -> dict:
    """Registry row for the candidate: production when the gate passed, else rejected with the reason."""
    from fashion_tagging.db import repository

    status = "production" if decision["promote"] else "rejected"
    with catalog_engine(settings).begin() as conn:
        repository.register_model(
            conn, trained["version"], trained["backbone"], trained["image_size"], trained["fine_tuned"],
            trained["artifact_uri"], metrics={**artifact_metrics(settings, trained["version"]), "gate": decision},
            article_type_accuracy=evaluation["article_type_accuracy"])
        if decision["promote"]:
            repository.promote_model(conn, trained["version"])
        else:
            repository.reject_model(conn, trained["version"], decision["reason"])
    return {"version": trained["version"], "status": status, "promoted": bool(decision["promote"]),
            "reason": decision["reason"], "artifact_uri": trained["artifact_uri"]}


# --- artifacts in the object store ------------------------------------------------------------


def artifact_prefix(settings: Settings, version: str) -> str:
    """Where a model version's artifact lives in the object store."""
    return f"{settings.models_prefix.rstrip('/')}/{version}"


def publish_artifact(settings: Settings, artifact_dir: str | os.PathLike) -> str:
    """Upload an artifact directory to ``<models_prefix><version>/``; returns its URI."""
    artifact_dir = Path(artifact_dir)
    prefix = artifact_prefix(settings, artifact_dir.name)
    store = object_store(settings)
    store.upload_dir(artifact_dir, prefix)
    return store.uri(prefix)


def artifact_metrics(settings: Settings, version: str) -> dict:
    """The artifact's ``metrics.json`` (evaluation reports by split), read from the store."""
    return json.loads(object_store(settings).get(f"{artifact_prefix(settings, version)}/metrics.json"))


def fetch_artifact(settings: Settings, version: str, artifact_uri: str) -> Path:
    """The local artifact directory of ``version``, downloaded from the store when absent."""
    local = settings.artifacts_dir / version
    if (local / "config.json").is_file():
        return local
    return object_store(settings).download_dir(artifact_prefix(settings, version), local)


# --- running a DAG without a scheduler (CLI demo, tests) ----------------------------------------


def local_airflow_env(settings: Settings) -> dict:
    """Environment for a self-contained Airflow under ``<home>/airflow`` (SQLite metadata, no examples)."""
    airflow_home = settings.home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings)}
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    })
    return env


def settings_env(settings: Settings) -> dict:
    """``FT_*`` variables that reproduce ``settings`` in a child process (tasks call get_settings()).

    Every setting ``name`` is read from ``FT_<NAME>`` (settings.py's convention); unset ones stay unset.
    """
    env = {f"FT_{field.name.upper()}": str(getattr(settings, field.name))
           for field in dataclasses.fields(settings) if getattr(settings, field.name) is not None}
    env["FT_OBJECT_STORE_URL"] = settings.resolved_object_store_url
    return env


def run_dag_locally(dag_id: str, conf: dict | None = None, *, settings: Settings | None = None,
                    timeout_s: float = 3600) -> dict:
    """Run one DAG end to end with ``airflow dags test`` (dag.test(): no scheduler, no workers).

    Returns the run's state, each task's state and each task's returned XCom value, read back from
    the local SQLite metadata database.
    """
    settings = settings or get_settings()
    env = local_airflow_env(settings)
    airflow = str(Path(sys.executable).with_name("airflow"))
    database = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    if not database.exists():
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    started = time.perf_counter()
    process = subprocess.run([airflow, "dags", "test", dag_id, "--conf", json.dumps(conf or {})],
                             env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - started
    result = latest_run(database, dag_id)
    result.update({"seconds": round(seconds, 1), "returncode": process.returncode})
    if result.get("state") != "success":
        result["log_tail"] = (process.stdout + process.stderr)[-6000:]
    return result


def latest_run(database: Path, dag_id: str) -> dict:
    """State, task states and returned values of the newest run of ``dag_id`` in a SQLite metadata DB."""
    with sqlite3.connect(database) as conn:
        row = conn.execute("SELECT run_id, state, start_date, end_date FROM dag_run WHERE dag_id = ? "
                           "ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
        if row is None:
            return {"dag_id": dag_id, "state": None, "tasks": {}, "xcom": {}}
        run_id, state, start_date, end_date = row
        tasks = conn.execute("SELECT task_id, map_index, state, duration FROM task_instance "
                             "WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)).fetchall()
        xcoms = conn.execute("SELECT task_id, map_index, value FROM xcom WHERE dag_id = ? AND run_id = ? "
                             "AND key = 'return_value'", (dag_id, run_id)).fetchall()
    return {
        "dag_id": dag_id, "run_id": run_id, "state": state,
        "run_seconds": _seconds_between(start_date, end_date),
        "tasks": _by_task((task_id, map_index, task_state) for task_id, map_index, task_state, _ in tasks),
        "task_seconds": {task_id: round(sum(d or 0.0 for t, _, _, d in tasks if t == task_id), 2)
                         for task_id in {t[0] for t in tasks}},
        "xcom": _by_task((task_id, map_index, json.loads(value) if value is not None else None)
                         for task_id, map_index, value in xcoms),
    }


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 2)


def _by_task(rows) -> dict:
    """{task_id: value} for plain tasks, {task_id: [value per map index]} for mapped ones."""
    grouped: dict[str, dict[int, object]] = {}
    for task_id, map_index, value in rows:
        grouped.setdefault(task_id, {})[map_index] = value
    return {task_id: [v for _, v in sorted(by_index.items())] if min(by_index) >= 0 else by_index[-1]
            for task_id, by_index in grouped.items()}
