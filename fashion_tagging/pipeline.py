"""The steps the Airflow DAGs run, free of Airflow so the CLI and tests call the very same code.

Every step takes plain JSON-able arguments and returns a JSON-able dict (it travels as an XCom).
Anything a later step needs on another worker (training snapshot, model artifact) goes through
the object store, never a local path: Celery may run consecutive tasks on different machines.
Module-level imports stay light because the DAG files import the asset names from here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from fashion_tagging.settings import PRIMARY_HEAD, PROJECT_ROOT, Settings, env_name, get_settings

log = logging.getLogger(__name__)

# Assets shared by the DAGs: the tagging DAG produces the first and is scheduled on the second
# and third (a run whose backlog exceeded its cap emits the third, so the backfill continues).
CATALOG_TAGS_ASSET = {"name": "catalog_tags", "uri": "fashion_tagging://catalog/tags"}
MODEL_PROMOTED_ASSET = {"name": "model_promoted", "uri": "fashion_tagging://models/promoted"}
TAGGING_BACKLOG_ASSET = {"name": "tagging_backlog", "uri": "fashion_tagging://catalog/backlog"}
# Emitted by a tagging run whose tags drifted from the training distribution: a DAG scheduled on it
# is the Airflow-side alert hook (the event's extra holds the run and its figures).
DRIFT_ALERT_ASSET = {"name": "drift_alert", "uri": "fashion_tagging://catalog/drift_alert"}

# Airflow refuses to map a list longer than [core] max_map_length (1024 by default).
AIRFLOW_MAX_MAP_LENGTH = 1024
SNAPSHOTS_PREFIX = "snapshots/"


# --- shared helpers ----------------------------------------------------------------------------


def catalog_engine(settings: Settings):
    """The catalog engine, migrated to head (imported lazily: DAG files import this module)."""
    from fashion_tagging.db.engine import migrate_database

    return migrate_database(settings)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# --- nightly tagging ---------------------------------------------------------------------------


def ingest_new_manifests(settings: Settings, run_id: str) -> dict:
    """Upsert the products of manifests new or rewritten since the last ingest (the manifest ledger).

    Bad rows are recorded under ``run_id``; manifests rejected whole (unreadable, a required
    column missing, half-written) are named in ``rejected_manifests`` and read again next run.
    """
    from fashion_tagging.ingest import load_catalog_into_db
    from fashion_tagging.objectstore import open_configured_store

    with catalog_engine(settings).begin() as conn:
        sync = load_catalog_into_db(conn, open_configured_store(settings), prefix=settings.catalog_prefix,
                                    run_id=run_id)
    if sync.rejected:
        log.warning("manifests rejected whole (see product_errors, run %s): %s", run_id, ", ".join(sync.rejected))
    return {"manifests": sync.manifest_keys, "products_read": sync.products_read,
            "products_written": sync.products_written, "row_errors": len(sync.errors),
            "rejected_manifests": sync.rejected}


def discover_tagging_work(settings: Settings, run_id: str | None = None) -> dict:
    """Ingest new manifests, open the run, and say how much each tagging version has left (a small dict).

    Nothing here grows with the catalog: the newest change_seq is one index probe, and the
    backlog is counted up to what one run can take.
    """
    from fashion_tagging.db import repository

    run_id = run_id or f"manual__{_now_iso()}"
    started_at = _now_iso()
    ingested = ingest_new_manifests(settings, run_id)
    per_run = max_tasks(settings) * task_max_products(settings)
    with catalog_engine(settings).begin() as conn:
        target_seq = repository.newest_change_seq(conn)
        products_total = repository.count_products(conn)
        versions = [{"version": m["version"], "status": m["status"], "tagged_seq": int(m["tagged_seq"]),
                     "backlog": repository.count_changes_between(conn, m["tagged_seq"], target_seq, limit=per_run + 1)}
                    for m in repository.tagging_models(conn)]
        repository.start_run(conn, run_id, model_version=versions[-1]["version"] if versions else None,
                             details={"ingested": ingested, "target_seq": target_seq, "versions": versions,
                                      "products_total": products_total})
    log.info("discover: ingested %s; newest change_seq %d; %s", ingested, target_seq,
             ", ".join(f"{v['version']} ({v['status']}): {v['backlog']} to tag" for v in versions) or "no model yet")
    return {"run_id": run_id, "started_at": started_at, "target_seq": target_seq, "versions": versions,
            "products_total": products_total, "ingested": ingested}


def max_tasks(settings: Settings) -> int:
    """The cap on mapped tagging tasks per run (at least 1, below Airflow's default max_map_length)."""
    return max(1, min(int(settings.tagging_max_tasks), AIRFLOW_MAX_MAP_LENGTH - 1))


def task_max_products(settings: Settings) -> int:
    """Products one mapped task may take on (never fewer than one transaction's worth)."""
    return max(int(settings.tagging_task_max_products), int(settings.tagging_batch_size), 1)


def plan_tagging_run(settings: Settings, discovered: dict) -> list[dict]:
    """Batch descriptors for this run: at most ``tagging_max_tasks`` of them, whatever the backlog.

    The serving version plans first (new arrivals stay visible to readers), then the promoted
    version's backfill takes the rest of the cap. Ranges grow with the backlog (up to
    ``tagging_task_max_products``) so the cap holds at any catalog size; what does not fit is
    planned by the next run. A descriptor is {batch_id, model_version, label}: tasks read their rows.
    """
    from fashion_tagging.db import repository

    cap, descriptors = max_tasks(settings), []
    chunk = max(1, int(settings.tagging_batch_size))
    with catalog_engine(settings).begin() as conn:
        for version in discovered["versions"]:
            room = cap - len(descriptors)
            size = min(max(math.ceil(version["backlog"] / max(room, 1)), chunk, int(settings.tagging_task_min_products)),
                       task_max_products(settings))
            for batch in repository.plan_tagging_batches(conn, version["version"], discovered["run_id"],
                                                         target_seq=discovered["target_seq"], max_batches=room,
                                                         products_per_batch=size):
                descriptors.append({"batch_id": int(batch["batch_id"]), "model_version": batch["model_version"],
                                    "label": f"{batch['model_version'][:24]} #{batch['batch_id']} "
                                             f"({batch['products']} products)"})
    if not discovered["versions"]:
        log.warning("Nothing to tag: no model is promoted or serving yet (run the retrain DAG).")
    log.info("plan: %d batch(es) for run %s (cap %d)", len(descriptors), discovered["run_id"], cap)
    return descriptors


def finish_tagging_run(settings: Settings, discovered: dict) -> dict:
    """Close the run from the work table, whatever happened to its tasks (the DAG runs it always).

    Advances each version's ``tagged_seq`` over its finished ranges, activates a promoted version
    that now covers the catalog as it stood when the run began (``target_seq``: later arrivals and
    products queued again after a failed photo fetch are tagged by the next run, by the version
    then serving), building its indexes, and records the run ``success`` or
    ``failed`` with every unfinished batch named with its error. ``more_work`` says whether the
    backlog exceeded this run's cap (the DAG then schedules itself again).

    A batch ``superseded`` (its version was retired by a promotion during the run: it stopped
    without writing, its rows were dropped with the version) is not a failure; the summary
    counts them, and the newly promoted version's backfill is planned by the next run.
    """
    from fashion_tagging.db import repository

    run_id = discovered["run_id"]
    engine = catalog_engine(settings)
    with engine.begin() as conn:
        batches = repository.run_batches(conn, run_id)
        newest = int(discovered["target_seq"])
        versions = {}
        for model in repository.tagging_models(conn):
            tagged_seq = repository.advance_tagged_seq(conn, model["version"])
            versions[model["version"]] = {"status": model["status"], "tagged_seq": tagged_seq,
                                          "covers_catalog": tagged_seq >= newest}
    activated = None
    for version, state in versions.items():
        if state["status"] == "promoted" and state["covers_catalog"]:
            with engine.begin() as conn:
                activated = {"version": version, **repository.activate_model(conn, version)}
            state["status"] = "serving"
            log.info("model %s tagged the whole catalog and now serves: %s", version, activated)
    failed = [{"batch_id": int(b["batch_id"]), "model_version": b["model_version"],
               "change_seq": [int(b["seq_from"]), int(b["seq_to"])], "status": b["status"],
               "error": b["error"] or "did not finish (worker lost or task not run)"}
              for b in batches if b["status"] not in ("done", "superseded")]
    tagged = sum(int(b["tagged"]) for b in batches)
    wall = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(discovered["started_at"])).total_seconds()
    busy = sum(float(b["seconds"]) for b in batches)
    summary = {
        "run_id": run_id, "status": "failed" if failed else "success",
        "model_version": next(iter(b["model_version"] for b in batches), None),
        "batches": len(batches), "failed_batches": failed,
        "superseded_batches": sum(b["status"] == "superseded" for b in batches),
        "products_seen": sum(int(b["products"]) for b in batches), "products_tagged": tagged,
        "text_only": sum(int(b["text_only"]) for b in batches), "errors": sum(int(b["errors"]) for b in batches),
        "seconds": round(wall, 2), "batch_seconds": round(busy, 2),
        "products_per_second": round(tagged / wall, 1) if wall else None,
        "products_per_batch_second": round(tagged / busy, 1) if busy else None,
        "versions": versions, "activated": activated, "ingested": discovered.get("ingested"),
        "products_total": discovered.get("products_total"),
        # a run cut short by a promotion (superseded batches) has the new version's backfill ahead
        "more_work": bool(not failed and (tagged or any(b["status"] == "superseded" for b in batches))
                          and any(not v["covers_catalog"] for v in versions.values())),
    }
    if not batches:
        summary["nothing_to_do"] = "no model promoted or serving yet" if not versions else "nothing new to tag"
    with engine.begin() as conn:
        repository.finish_run(conn, run_id, status=summary["status"], products_seen=summary["products_seen"],
                              products_tagged=tagged, errors=summary["errors"], batches=len(batches),
                              seconds=summary["seconds"], details=summary)
    log.info("Tagging run summary: %s", json.dumps(summary, default=str))
    return summary


def check_tagging_drift(settings: Settings, discovered: dict) -> dict:
    """Compare what this run tagged with each tagging model's training distribution; store and alert.

    One ``tagging_drift`` row per version that tagged products in the run (an upsert: a retried
    check replaces it). A version whose artifact has no calibration.json (no reference) is skipped
    and named. An alert logs a warning and calls ``FT_DRIFT_ALERT_CALLBACK`` (see drift.py).
    """
    from fashion_tagging import drift
    from fashion_tagging.dashboard import read_artifact_file
    from fashion_tagging.db import repository

    run_id = discovered["run_id"]
    engine = catalog_engine(settings)
    with engine.connect() as conn:
        counts = repository.run_tag_counts(conn, run_id)
        uris = {version: repository.get_model(conn, version)["artifact_uri"] for version in counts}
    reports, skipped = [], {}
    for version, version_counts in counts.items():
        raw = read_artifact_file(settings, version, uris[version], "calibration.json")
        reference = (json.loads(raw) if raw else {}).get("training_distribution")
        if not reference:
            skipped[version] = "the artifact has no calibration.json (trained before calibration): no reference"
            continue
        report = drift.measure(run_id, version, version_counts, reference, threshold=settings.drift_threshold,
                               min_products=settings.drift_min_products)
        with engine.begin() as conn:
            repository.record_drift(conn, report)
        log.info("drift of run %s, model %s: %s", run_id, version, report["details"]["verdict"])
        if report["alert"]:
            drift.raise_alert(report, settings.drift_alert_callback)
        reports.append({key: report[key] for key in ("model_version", "products", "category_js", "category_psi",
                                                     "confidence_js", "confidence_psi", "threshold", "alert")})
    return {"run_id": run_id, "alert": any(r["alert"] for r in reports), "reports": reports, "skipped": skipped}


# --- retraining --------------------------------------------------------------------------------


def snapshot_training_data(settings: Settings) -> dict:
    """Freeze the labelled catalog (rows with a split, deleted ones left out) into a Parquet object in the store.

    Reviewers' values are the labels (``review.apply_review_labels``): they replace the catalog's
    label of their head, and a reviewed product without a split joins ``train``. The summary's
    ``review_labels`` says how many were used (and how many were corrections of the model).
    Rows stream from a server-side cursor into a Parquet file ``SNAPSHOT_CHUNK_ROWS`` at a time,
    which is uploaded as one object (multipart on S3): memory does not grow with the catalog.
    """
    import tempfile
    from collections import Counter

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    from fashion_tagging.db.repository import PRODUCT_COLUMN_MAP
    from fashion_tagging.db.schema import products
    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.review import REVIEW_LABELS_KEY, apply_review_labels, reviewed_products_clause

    snapshot_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    ingested = ingest_new_manifests(settings, f"snapshot-{snapshot_id}")
    engine = catalog_engine(settings)
    columns = [products.c[name].label(alias) for alias, name in PRODUCT_COLUMN_MAP.items() if alias != "source"]
    labelled = sa.or_(products.c.split.is_not(None), reviewed_products_clause(products.c.product_id))
    query = sa.select(*columns).where(labelled, products.c.deleted_at.is_(None)).order_by(products.c.product_id)
    # One schema for every chunk (a chunk whose column is all NULL would otherwise infer another).
    schema = pa.schema([(column.name, pa.int64() if column.name == "id" else pa.float64() if column.name == "year"
                         else pa.string()) for column in columns])
    key = f"{SNAPSHOTS_PREFIX}{snapshot_id}.parquet"
    splits, review_labels, rows = Counter(), {}, 0
    with tempfile.TemporaryDirectory(prefix="ft-snapshot-") as tmp:
        path = Path(tmp) / "snapshot.parquet"
        with engine.connect() as conn, engine.connect() as reviews_conn, pq.ParquetWriter(path, schema) as writer:
            chunks = pd.read_sql(query, conn.execution_options(stream_results=True), chunksize=SNAPSHOT_CHUNK_ROWS)
            for chunk in chunks:
                chunk, chunk_review_labels = apply_review_labels(reviews_conn, chunk)
                review_labels = merge_review_summaries(review_labels, chunk_review_labels)
                splits.update(str(split) for split in chunk["split"].dropna())
                rows += len(chunk)
                writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
        if not rows:
            raise ValueError("no labelled products in the catalog database: ingest the reference catalog first")
        open_configured_store(settings).put_file(key, path)
    splits = dict(sorted(splits.items()))
    log.info("snapshot %s: %d labelled products %s", key, rows, splits)
    log.info("snapshot %s: %d reviewed labels used as training labels (%d corrections of the model, "
             "%d changed the catalog's label, %d reviewed products added to train)", key, review_labels["labels"],
             review_labels["corrections"], review_labels["changed_labels"], review_labels["added_to_train"])
    return {"snapshot_key": key, "products": rows, "splits": splits, "ingested": ingested,
            REVIEW_LABELS_KEY: review_labels}


SNAPSHOT_CHUNK_ROWS = 50_000


def merge_review_summaries(total: dict, chunk: dict) -> dict:
    """Add one chunk's ``apply_review_labels`` summary to the snapshot's (each product is in one chunk)."""
    if not total:
        return chunk
    merged = {key: total[key] + chunk[key] for key in total if key != "by_head"}
    merged["by_head"] = {head: dict(counts) for head, counts in total["by_head"].items()}
    for head, counts in chunk["by_head"].items():
        into = merged["by_head"].setdefault(head, {"labels": 0, "corrections": 0})
        for name, value in counts.items():
            into[name] = into.get(name, 0) + value
    return merged


def load_snapshot(settings: Settings, snapshot: dict, splits: tuple[str, ...]):
    """The snapshot's rows in ``splits`` as the catalog frame train/evaluate expect, with local image files.

    The object is spooled to a temporary file and read a row group at a time, keeping only ``splits``.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    from fashion_tagging.catalog import clean_html, product_text, with_clean_labels
    from fashion_tagging.objectstore import open_configured_store

    parts = []
    with open_configured_store(settings).open(snapshot["snapshot_key"]) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=SNAPSHOT_CHUNK_ROWS):
            part = batch.to_pandas()
            parts.append(part[part["split"].isin(splits)])
    frame = with_clean_labels(pd.concat(parts, ignore_index=True))
    frame["description"] = frame["description"].map(clean_html)
    frame["text"] = [product_text(t, d) for t, d in zip(frame["productDisplayName"], frame["description"], strict=True)]
    frame["image_path"] = materialize_images(settings, frame)
    return frame


PHOTO_LEDGER_FILE = ".fingerprints.parquet"  # object key -> store fingerprint of the local copy
PHOTO_FETCH_CHUNK = 2000


def materialize_images(settings: Settings, frame) -> list:
    """Local copies of the products' photos, downloading those new or replaced in the object store since copied.

    One listing gives every photo's store fingerprint (ETag, or size+mtime); a local copy whose
    recorded fingerprint still matches is current and is not downloaded again. The feature store
    is keyed by the copies' bytes: a replaced photo is embedded anew, an unchanged one never.
    """
    from fashion_tagging.artifacts import write_file_atomically
    from fashion_tagging.objectstore import ObjectNotFound, open_configured_store

    store = open_configured_store(settings)
    image_dir = settings.cache_dir / "images"
    ledger = read_photo_ledger(image_dir)
    keys = [key if isinstance(key, str) and key else None for key in frame["image_key"]]  # NaN: no photo
    listed = store.list_fingerprints(settings.images_prefix) if any(keys) else {}
    paths, to_fetch, current = [], {}, {}
    for key in keys:
        if key is None:
            paths.append(None)
            continue
        path = image_dir / key
        paths.append(str(path))
        if key in current or key in to_fetch:
            continue
        fingerprint = listed.get(key)
        if fingerprint is None and not key.startswith(settings.images_prefix):
            try:
                fingerprint = store.fingerprint(key)
            except ObjectNotFound:
                pass
        if fingerprint is not None and ledger.get(key) == fingerprint and path.is_file():
            current[key] = fingerprint
        else:
            to_fetch[key] = path
            current[key] = fingerprint
    if to_fetch:
        log.info("downloading %d product photos (%d local copies current)", len(to_fetch), len(current) - len(to_fetch))
        pending = list(to_fetch)
        for start in range(0, len(pending), PHOTO_FETCH_CHUNK):  # a chunk's bytes in memory at a time
            for key, data in store.get_many(pending[start:start + PHOTO_FETCH_CHUNK]).items():
                path = to_fetch[key]
                if isinstance(data, Exception):
                    log.warning("image %s unavailable: %s", key, data)  # embedding step records it per product
                    path.unlink(missing_ok=True)  # a stale copy must not stand in for it
                    ledger.pop(key, None)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomically(path, data)
                if current[key] is not None:
                    ledger[key] = current[key]
        write_photo_ledger(image_dir, ledger)
    return paths


def read_photo_ledger(image_dir: Path) -> dict[str, str]:
    """Object key -> the store fingerprint its local copy was downloaded at (empty when none yet)."""
    import pandas as pd

    path = image_dir / PHOTO_LEDGER_FILE
    if not path.is_file():
        return {}
    table = pd.read_parquet(path)
    return dict(zip(table["key"], table["fingerprint"], strict=True))


def write_photo_ledger(image_dir: Path, ledger: dict[str, str]) -> None:
    """Replace the ledger atomically; two retrains writing at once lose at most a re-download."""
    import io

    import pandas as pd

    from fashion_tagging.artifacts import write_file_atomically

    buffer = io.BytesIO()
    pd.DataFrame({"key": list(ledger), "fingerprint": list(ledger.values())}).to_parquet(buffer, index=False)
    write_file_atomically(image_dir / PHOTO_LEDGER_FILE, buffer.getvalue())


def candidate_settings(settings: Settings, params: dict) -> Settings:
    """Settings with the run's params (backbone, image size, epochs) applied."""
    overrides = {name: params[name] for name in ("backbone", "image_size", "epochs") if params.get(name) is not None}
    return settings.replace(**overrides)


def train_model(settings: Settings, params: dict, snapshot: dict) -> dict:
    """Train a candidate on the snapshot's train/val splits; its artifact goes to the object store."""
    from fashion_tagging.artifacts import read_config
    from fashion_tagging.review import REVIEW_LABELS_KEY, record_in_artifact
    from fashion_tagging.train import fine_tune_mode, train

    settings = candidate_settings(settings, params)
    mode = fine_tune_mode(params["fine_tune"] if params.get("fine_tune") is not None else settings.fine_tune)
    # Loaded by train itself, so the snapshot's frame goes once it has taken the columns it trains on.
    result = train(settings, products=lambda: load_snapshot(settings, snapshot, ("train", "val")),
                   epochs=settings.epochs, progress=False, fine_tune=mode)
    review_labels = snapshot.get(REVIEW_LABELS_KEY) or {}
    record_in_artifact(result.artifact_dir, review_labels)  # config.json says which reviewed labels it learnt
    log.info("%s trained with %d reviewed labels (%d corrections)", result.version, review_labels.get("labels", 0),
             review_labels.get("corrections", 0))
    artifact_uri = publish_artifact(settings, result.artifact_dir)
    config = read_config(result.artifact_dir)
    return {"version": result.version, "artifact_uri": artifact_uri, "backbone": config["backbone"],
            "image_size": int(config["image_size"]), "fine_tuned": bool(config.get("fine_tuned", False)),
            "epochs_run": config.get("epochs_run"), "timings": result.timings,
            "best_val_article_type_accuracy": config.get("best_val_article_type_accuracy"),
            REVIEW_LABELS_KEY: review_labels}


def evaluate_model(settings: Settings, trained: dict, snapshot: dict, *, split: str = "test") -> dict:
    """Score the candidate, and the production model, on the same snapshot's fixed test split.

    The candidate's full report joins its artifact. The production model (promoted or serving,
    if any) predicts the very same products in this task, so the gate compares paired
    predictions (``paired``: both accuracies and the discordant pairs) rather than a figure the
    production model got on another snapshot.
    """
    from fashion_tagging.evaluate import evaluate

    artifact_dir = fetch_artifact(settings, trained["version"])
    frame = load_snapshot(settings, snapshot, (split,))
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
        "calibration": {head: {key: scores.get(key) for key in ("ece_before", "ece_after", "coverage",
                                                                 "accepted_accuracy")}
                        for head, scores in (report.get("calibration") or {}).items()},
        "paired": paired_with_production(settings, trained, artifact_dir, frame, split),
    }


def paired_with_production(settings: Settings, trained: dict, artifact_dir: Path, frame, split: str) -> dict | None:
    """Candidate and production fused articleType predictions on the same products; None without production."""
    from fashion_tagging.catalog import with_clean_labels
    from fashion_tagging.db import repository
    from fashion_tagging.evaluate import paired_scores, primary_predictions

    with catalog_engine(settings).connect() as conn:
        production = repository.production_model(conn)
    if production is None or production["version"] == trained["version"]:
        return None
    production_dir = fetch_artifact(settings, production["version"])
    # The same local photos serve both models: each takes its features from the shared store.
    rows = with_clean_labels(frame, (PRIMARY_HEAD,))
    production_rows = rows
    candidate = primary_predictions(artifact_dir, settings, rows)
    production_labels = primary_predictions(production_dir, settings, production_rows)
    scores = paired_scores(rows[PRIMARY_HEAD].tolist(), candidate, production_labels)
    log.info("paired on %d %s products: candidate %s %.4f, production %s %.4f; only the candidate right on %d, "
             "only production right on %d", scores["products"], split, trained["version"],
             scores["candidate_accuracy"], production["version"], scores["production_accuracy"],
             scores["candidate_only_right"], scores["production_only_right"])
    return {"production_version": production["version"], "split": split, **scores}


def mcnemar_exact_p_value(candidate_only_right: int, production_only_right: int) -> float:
    """One-sided exact McNemar test: P(at least ``b`` of the ``b + c`` discordant pairs favour the candidate)
    if both models were equally good (each discordant pair a fair coin); 1.0 without discordant pairs."""
    from scipy.stats import binomtest

    b, c = int(candidate_only_right), int(production_only_right)
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def gate(evaluation: dict, baseline: float, significance: float) -> dict:
    """Promote only if articleType accuracy >= baseline AND (no production model, or the candidate is
    significantly better than production on the same test products: one-sided exact McNemar test,
    p < ``significance``). Ties and noise never promote."""
    candidate = float(evaluation["article_type_accuracy"])
    paired = evaluation.get("paired")
    figures = {"candidate_version": evaluation.get("version"), "candidate_accuracy": candidate,
               "baseline": float(baseline), "significance": float(significance),
               "test": "McNemar exact, one-sided (binomial test on discordant pairs)",
               "production_version": None, "production_accuracy": None, "paired_products": None,
               "candidate_only_right": None, "production_only_right": None, "p_value": None}
    if paired:
        figures.update({"production_version": paired["production_version"],
                        "production_accuracy": float(paired["production_accuracy"]),
                        "paired_products": int(paired["products"]),
                        "candidate_only_right": int(paired["candidate_only_right"]),
                        "production_only_right": int(paired["production_only_right"]),
                        "p_value": round(mcnemar_exact_p_value(paired["candidate_only_right"],
                                                               paired["production_only_right"]), 6)})
    if candidate < baseline:
        reason = f"articleType accuracy {candidate:.4f} is below the baseline {baseline:.4f}"
        return {"promote": False, "reason": reason, **figures}
    if not paired:
        reason = f"articleType accuracy {candidate:.4f} >= baseline {baseline:.4f} and no production model yet"
        return {"promote": True, "reason": reason, **figures}
    versus = (f"production {paired['production_version']} on the same {figures['paired_products']} test products: "
              f"{candidate:.4f} vs {figures['production_accuracy']:.4f}, only the candidate right on "
              f"{figures['candidate_only_right']}, only production right on {figures['production_only_right']}, "
              f"one-sided exact McNemar p = {figures['p_value']:.4g}")
    if figures["p_value"] < significance:
        reason = f"articleType accuracy {candidate:.4f} >= baseline {baseline:.4f} and significantly better than {versus}"
        return {"promote": True, "reason": reason, **figures}
    reason = f"not significantly better (p >= {significance:g}) than {versus}"
    return {"promote": False, "reason": reason, **figures}


def register_and_promote(settings: Settings, trained: dict, evaluation: dict, decision: dict) -> dict:
    """Registry row for the candidate: promoted when the gate passed (it serves once the tagging DAG has
    tagged the whole catalog with it), else rejected with the reason."""
    from fashion_tagging.db import repository

    status = "promoted" if decision["promote"] else "rejected"
    with catalog_engine(settings).begin() as conn:
        repository.register_model(
            conn, trained["version"], trained["backbone"], trained["image_size"], trained["fine_tuned"],
            trained["artifact_uri"], metrics={**artifact_metrics(settings, trained["version"]), "gate": decision,
                                              "review_labels": trained.get("review_labels") or {}},
            article_type_accuracy=evaluation["article_type_accuracy"])
        if decision["promote"]:
            repository.promote_model(conn, trained["version"], decision["reason"])
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
    from fashion_tagging.objectstore import open_configured_store

    artifact_dir = Path(artifact_dir)
    prefix = artifact_prefix(settings, artifact_dir.name)
    store = open_configured_store(settings)
    store.upload_dir(artifact_dir, prefix)
    return store.uri(prefix)


def artifact_metrics(settings: Settings, version: str) -> dict:
    """The artifact's ``metrics.json`` (evaluation reports by split), read from the store."""
    from fashion_tagging.objectstore import open_configured_store

    return json.loads(open_configured_store(settings).get(f"{artifact_prefix(settings, version)}/metrics.json"))


def fetch_artifact(settings: Settings, version: str) -> Path:
    """A writable copy of ``version`` under the artifacts dir, downloaded from the store when absent.

    Evaluation adds its reports to it and publishes it again, so it is never the registered artifact
    itself nor the tagging cache (``artifacts.local_artifact_dir``).
    """
    from fashion_tagging.objectstore import open_configured_store

    local = settings.artifacts_dir / version
    if (local / "config.json").is_file():
        return local
    return open_configured_store(settings).download_dir(artifact_prefix(settings, version), local)


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
    env = {env_name(name): str(getattr(settings, name))
           for name in type(settings).model_fields if getattr(settings, name) is not None}
    env["FT_OBJECT_STORE_URL"] = settings.resolved_object_store_url
    return env


def run_dag_locally(dag_id: str, conf: dict | None = None, *, settings: Settings | None = None,
                    timeout_s: float = 3600, on_line=None) -> dict:
    """Run one DAG end to end with ``airflow dags test`` (dag.test(): no scheduler, no workers).

    Its whole output goes to a log file under ``<home>/airflow/dag-test-logs`` (the result's
    ``log_path``) as it is written; ``on_line(line)`` sees each line at once (the demo's live
    progress). Returns the run's state, each task's state and each task's returned XCom value,
    read back from the local SQLite metadata database.
    """
    settings = settings or get_settings()
    env = local_airflow_env(settings)
    airflow = str(Path(sys.executable).with_name("airflow"))
    database = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    if not database.exists():
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    log_path = Path(env["AIRFLOW_HOME"]) / "dag-test-logs" / f"{dag_id}-{dt.datetime.now():%Y%m%dT%H%M%S}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Text mode reads "\r" as a line end, so a progress bar's redraws arrive as lines too.
    with open(log_path, "w") as log_file, subprocess.Popen(
            [airflow, "dags", "test", dag_id, "--conf", json.dumps(conf or {})], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as process:
        watchdog = threading.Timer(timeout_s, process.kill)
        watchdog.start()
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                if on_line is not None and line.strip():
                    on_line(line.rstrip("\n"))
        finally:
            watchdog.cancel()
        returncode = process.wait()
    seconds = time.perf_counter() - started
    result = latest_run(database, dag_id)
    result.update({"seconds": round(seconds, 1), "returncode": returncode, "log_path": str(log_path)})
    if result.get("state") != "success":
        result["log_tail"] = log_tail(log_path)
    return result


def log_tail(path: Path, chars: int = 6000) -> str:
    """The last ``chars`` characters of a log file (what a failed run shows)."""
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - chars))
        return file.read().decode("utf-8", errors="replace")


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
