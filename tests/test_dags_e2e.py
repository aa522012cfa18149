"""Both DAGs end to end with ``dag.test()`` (``airflow dags test``) on a real slice of the catalog.

Real parts: embedded PostgreSQL + pgvector (catalog DB), the S3 protocol (moto's server) as the
object store, a SQLite Airflow metadata DB, real training at a small image size. Order: the retrain
DAG (rejected at the real 0.91 baseline, then promoted with the gate's baseline lowered, since a
300-product model cannot reach 0.91), then the tagging DAG: tags land once, a second night finds
nothing new, and re-tagging changed products updates rows instead of duplicating them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging import pipeline
from fashion_tagging.db.engine import engine_for_url
from fashion_tagging.objectstore import S3Store
from fashion_tagging.settings import BASELINE_ACCURACY
from tests.fixtures_data import DATA_DIR, slice_ids
from tests.fixtures_model import tiny_settings
from tests.fixtures_services import drop_database, new_database

pytestmark = pytest.mark.slow

RETRAIN_CONF = {"epochs": 2, "image_size": 64, "backbone": "efficientnet-lite0", "fine_tune": "top"}
NEW_PRODUCTS = 20  # a second manifest arriving after the first tagging run


@pytest.fixture(scope="module")
def world(postgres_url, s3_endpoint, kaggle_slice_dir, ft_home):
    """Catalog DB + bucket holding the slice's manifest and photos, and settings pointing at them."""
    from fashion_tagging.ingest import import_kaggle_catalog

    db_url = new_database(postgres_url, prefix="dags")
    bucket = "dags-e2e"
    store = S3Store(bucket, endpoint_url=s3_endpoint)
    store.client.create_bucket(Bucket=bucket)
    settings = tiny_settings(ft_home, kaggle_slice_dir, database_url=db_url, object_store_url=f"s3://{bucket}/",
                             s3_endpoint_url=s3_endpoint, tagging_batch_size=100, tagging_task_min_products=1,
                             baseline_accuracy=BASELINE_ACCURACY)
    import_kaggle_catalog(kaggle_slice_dir, store)
    import_kaggle_catalog(DATA_DIR, store, ids=labelled_ids_without_photo(), batch_name="no-photos")
    yield {"settings": settings, "engine": engine_for_url(db_url), "store": store}
    drop_database(postgres_url, db_url)


def labelled_ids_without_photo(n: int = 3) -> list[int]:
    """Real catalog products that have no photo (text-only training and tagging rows)."""
    split = pd.read_csv(DATA_DIR / "split.csv")
    train_ids = split.loc[split["split"] == "train", "id"]
    return [int(i) for i in train_ids if not (DATA_DIR / "images" / f"{i}.jpg").is_file()][:n]


def run_details(engine, run_id: str) -> dict:
    """The run's full summary, as ``finish`` recorded it in tagging_runs."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT details FROM tagging_runs WHERE run_id = :r"), {"r": run_id}).scalar_one()


def promoted_version(engine, status: str) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT version FROM model_versions WHERE status = :s"), {"s": status}).scalar_one()


def count(engine, sql: str, **params) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


@pytest.fixture(scope="module")
def rejected_run(world):
    return pipeline.run_dag_locally("retrain_tagger", RETRAIN_CONF, settings=world["settings"])


@pytest.fixture(scope="module")
def reviewed_correction(world, rejected_run):
    """A reviewer corrects a train product's articleType (to another class of the slice) before the next retrain."""
    from fashion_tagging import review

    with world["engine"].begin() as conn:
        product_id, label = conn.execute(sa.text("SELECT product_id, article_type FROM products WHERE split = 'train' "
                                                 "ORDER BY product_id LIMIT 1")).one()
        other = conn.execute(sa.text("SELECT article_type FROM products WHERE split = 'train' AND article_type <> :l "
                                     "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"), {"l": label}).scalar_one()
        review.submit_review(conn, product_id, {"articleType": other}, "e2e-reviewer", version=None)
    return {"product_id": product_id, "label": other}


@pytest.fixture(scope="module")
def promoted_run(world, rejected_run, reviewed_correction):
    settings = world["settings"].replace(baseline_accuracy=0.0)
    return pipeline.run_dag_locally("retrain_tagger", RETRAIN_CONF, settings=settings)


@pytest.fixture(scope="module")
def first_tagging(world, promoted_run):
    return pipeline.run_dag_locally("catalog_tagging", settings=world["settings"])


def test_retrain_below_baseline_is_rejected_and_production_untouched(world, rejected_run):
    assert rejected_run["state"] == "success", rejected_run.get("log_tail")
    decision = rejected_run["xcom"]["gate"]
    assert decision["promote"] is False and "below the baseline 0.9100" in decision["reason"]
    assert decision["candidate_accuracy"] < BASELINE_ACCURACY
    assert rejected_run["tasks"]["announce_promotion"] == "skipped"  # no "model promoted" asset event
    with world["engine"].connect() as conn:
        rows = conn.execute(sa.text("SELECT status, gate_reason FROM model_versions")).all()
    assert [(status, reason) for status, reason in rows] == [("rejected", decision["reason"])]
    snapshot = rejected_run["xcom"]["snapshot"]
    assert snapshot["splits"]["train"] > snapshot["splits"]["test"] > 0


def test_retrain_promotes_a_passing_candidate_and_emits_the_asset(world, promoted_run):
    assert promoted_run["state"] == "success", promoted_run.get("log_tail")
    decision = promoted_run["xcom"]["gate"]
    assert decision["promote"] is True and decision["baseline"] == 0.0
    assert "no production model yet" in decision["reason"] and decision["p_value"] is None  # the first was rejected
    assert promoted_run["tasks"]["announce_promotion"] == "success"
    version = promoted_run["xcom"]["register"]["version"]
    with world["engine"].connect() as conn:
        production = conn.execute(sa.text(
            "SELECT version, artifact_uri, metrics -> 'test' ->> 'split' FROM model_versions "
            "WHERE status = 'promoted'")).one()  # serves once it has tagged the catalog
    assert production[0] == version and production[1].startswith("s3://dags-e2e/models/")
    assert production[2] == "test"
    with world["engine"].connect() as conn:
        reason, gate = conn.execute(sa.text("SELECT gate_reason, metrics -> 'gate' FROM model_versions "
                                            "WHERE version = :v"), {"v": version}).one()
    assert reason == decision["reason"] and gate["promote"] is True
    calibration = promoted_run["xcom"]["evaluate"]["calibration"]  # fitted at training, reported on test
    assert calibration["articleType"]["ece_before"] is not None and "coverage" in calibration["articleType"]
    assert world["store"].exists(f"models/{version}/calibration.json")
    assert world["store"].exists(f"models/{version}/model.keras")


def test_the_gate_scores_candidate_and_production_on_the_same_test_products(world, rejected_run, promoted_run):
    """The evaluate step pairs a candidate (the first, rejected model) with the production model."""
    from fashion_tagging.pipeline import evaluate_model, gate, mcnemar_exact_p_value

    evaluation = evaluate_model(world["settings"], rejected_run["xcom"]["train"], rejected_run["xcom"]["snapshot"])
    paired = evaluation["paired"]
    assert paired["production_version"] == promoted_run["xcom"]["register"]["version"]
    assert paired["products"] == rejected_run["xcom"]["snapshot"]["splits"]["test"]
    assert paired["candidate_accuracy"] == evaluation["article_type_accuracy"]
    # the production model scores on these products exactly what its own evaluation found on them
    assert paired["production_accuracy"] == promoted_run["xcom"]["evaluate"]["article_type_accuracy"]
    assert paired["candidate_only_right"] + paired["production_only_right"] + paired["both_right"] + \
        paired["both_wrong"] == paired["products"]
    decision = gate(evaluation, 0.0, 0.05)
    assert decision["p_value"] == pytest.approx(mcnemar_exact_p_value(paired["candidate_only_right"],
                                                                      paired["production_only_right"]), abs=1e-6)
    assert decision["promote"] is (decision["p_value"] < 0.05)


def test_the_retrain_reports_the_reviewed_correction_among_its_training_labels(world, rejected_run, promoted_run):
    assert rejected_run["xcom"]["snapshot"]["review_labels"]["labels"] == 0  # before the review
    used = promoted_run["xcom"]["snapshot"]["review_labels"]
    assert (used["labels"], used["corrections"], used["changed_labels"], used["added_to_train"]) == (1, 1, 1, 0)
    assert used["by_head"] == {"articleType": {"labels": 1, "corrections": 1}}
    assert promoted_run["xcom"]["train"]["review_labels"] == used
    version = promoted_run["xcom"]["register"]["version"]
    with world["engine"].connect() as conn:
        registered = conn.execute(sa.text("SELECT metrics -> 'review_labels' FROM model_versions WHERE version = :v"),
                                  {"v": version}).scalar_one()
    assert registered == used
    assert json.loads(world["store"].get(f"models/{version}/config.json"))["review_labels"] == used
    log = Path(promoted_run["log_path"]).read_text()
    assert "1 reviewed labels used as training labels (1 corrections of the model" in log  # the snapshot task
    assert "trained with 1 reviewed labels (1 corrections)" in log  # the train task


def test_tagging_tags_every_product_once(world, first_tagging):
    assert first_tagging["state"] == "success", first_tagging.get("log_tail")
    engine = world["engine"]
    products = count(engine, "SELECT count(*) FROM products")
    assert first_tagging["xcom"]["finish"]["status"] == "success"
    summary = run_details(engine, first_tagging["run_id"])
    assert summary["batches"] == len(first_tagging["tasks"]["tag_batch"]) >= 2
    plan = first_tagging["xcom"]["plan"]  # descriptors, never the ids themselves
    assert all(set(batch) == {"batch_id", "model_version", "label"} for batch in plan)
    assert len(json.dumps(plan)) < 200 * summary["batches"]
    assert summary["activated"]["version"] == promoted_version(engine, "serving")  # it covers the catalog now
    # Every product has a title, so every one is tagged (the corrupt photo's from text, as an error).
    assert count(engine, "SELECT count(*) FROM tags") == summary["products_tagged"] == products
    assert summary["errors"] >= 1 and summary["products_per_second"] > 0
    assert count(engine, "SELECT count(*) FROM tags") == count(engine, "SELECT count(DISTINCT product_id) FROM tags")
    assert count(engine, "SELECT count(*) FROM embeddings") == count(engine, "SELECT count(*) FROM tags")
    assert count(engine, "SELECT count(*) FROM tagging_runs WHERE status = 'success' AND products_tagged > 0") == 1
    # In distribution (the catalog the model was trained on): measured, stored, no alert.
    drift = first_tagging["xcom"]["check_drift"]
    assert drift["alert"] is False and drift["reports"][0]["products"] == summary["products_tagged"]
    assert drift["reports"][0]["category_js"] < drift["reports"][0]["threshold"]
    assert first_tagging["tasks"]["announce_drift"] == "skipped"
    assert count(engine, "SELECT count(*) FROM tagging_drift WHERE NOT alert") == 1
    assert count(engine, "SELECT count(*) FROM tags WHERE review_status IS NULL") == 0


def test_quiet_night_new_manifest_and_rerun_never_duplicate(world, first_tagging):
    from fashion_tagging.ingest import import_kaggle_catalog

    engine, settings = world["engine"], world["settings"]
    tags_before = count(engine, "SELECT count(*) FROM tags")

    quiet = pipeline.run_dag_locally("catalog_tagging", settings=settings)
    assert quiet["state"] == "success"
    assert quiet["tasks"]["tag_batch"] == "skipped" and quiet["xcom"]["plan"] == []
    assert [v["backlog"] for v in quiet["xcom"]["discover"]["versions"]] == [0]
    assert run_details(engine, quiet["run_id"])["nothing_to_do"] == "nothing new to tag"
    assert count(engine, "SELECT count(*) FROM tags") == tags_before

    known = set(slice_ids())
    catalog_ids = pd.read_csv(DATA_DIR / "split.csv")["id"]
    new_ids = [int(i) for i in catalog_ids if i not in known and (DATA_DIR / "images" / f"{i}.jpg").is_file()]
    import_kaggle_catalog(DATA_DIR, world["store"], ids=new_ids[:NEW_PRODUCTS], batch_name="night-2")
    with engine.begin() as conn:  # products changed since tagging must be re-tagged, not duplicated
        conn.execute(sa.text("UPDATE products SET title = title || ' (new season)' WHERE product_id IN "
                             "(SELECT product_id FROM tags ORDER BY product_id LIMIT 5)"))
        conn.execute(sa.text("UPDATE products SET updated_at = now() + interval '1 second' WHERE title LIKE "
                             "'%(new season)'"))
    second = pipeline.run_dag_locally("catalog_tagging", settings=settings)
    assert second["state"] == "success", second.get("log_tail")
    assert second["xcom"]["finish"]["products_tagged"] == NEW_PRODUCTS + 5
    assert count(engine, "SELECT count(*) FROM tags") == tags_before + NEW_PRODUCTS
    assert count(engine, "SELECT count(*) FROM tags") == count(engine, "SELECT count(DISTINCT product_id) FROM tags")
