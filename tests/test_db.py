"""Catalog database on a real embedded PostgreSQL + pgvector: migrations, idempotent writes,
the model registry and similar-product search."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fashion_tagging.errors import RowError
from fashion_tagging.db import repository, schema
from fashion_tagging.db.engine import engine_for_url, get_engine, migrate, migrate_database, running_port, \
    stop_embedded_postgres
from fashion_tagging.ingest import import_catalog, load_catalog_into_db
from fashion_tagging.objectstore import open_store
from fashion_tagging.settings import get_settings
from tests.fixtures_services import KAGGLE_SLICE_BAD_ROWS, KAGGLE_SLICE_SIZE, drop_database, new_database, \
    synthetic_predictions, tag_and_embedding_rows, untagged_product_ids

VERSION = "v-test"


def products_frame(ids, title="Product"):
    return pd.DataFrame({"id": list(ids), "productDisplayName": [f"{title} {i}" for i in ids],
                         "articleType": ["Tshirts"] * len(ids), "year": [2012] * len(ids)})


def count(conn, table) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


@pytest.fixture
def tagged_db(catalog_engine):
    """Products 1..n plus a registered, promoted model, ready for tag writes."""
    with catalog_engine.begin() as conn:
        repository.upsert_products(conn, products_frame(range(1, 41)))
        repository.register_model(conn, VERSION, "efficientnet-lite0", 224, False, "file:///tmp/x", {}, 0.9)
        repository.promote_model(conn, VERSION)
    return catalog_engine


def test_migrations_from_empty_database_match_schema(postgres_url):
    url = new_database(postgres_url, migrated=False)
    try:
        engine = engine_for_url(url)
        threads = [threading.Thread(target=migrate, args=(engine,)) for _ in range(3)]  # concurrent callers
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        migrate(engine)  # and again: a no-op
        with engine.connect() as conn:
            drift = compare_metadata(MigrationContext.configure(conn), schema.metadata)
            partitioned = conn.execute(sa.text("SELECT c.relname FROM pg_partitioned_table p "
                                               "JOIN pg_class c ON c.oid = p.partrelid")).scalars().all()
            assert conn.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
        assert drift == []
        assert sorted(partitioned) == ["embeddings", "tags"]
    finally:
        drop_database(postgres_url, url)


def test_product_upserts_are_idempotent(catalog_engine):
    with catalog_engine.begin() as conn:
        assert repository.upsert_products(conn, products_frame([1, 2, 3])) == 3
    with catalog_engine.begin() as conn:
        first_update = conn.execute(sa.select(schema.products.c.updated_at)).scalars().all()
        assert repository.upsert_products(conn, products_frame([1, 2, 3])) == 0  # unchanged rows untouched
        assert repository.upsert_products(conn, products_frame([3], title="Renamed")) == 1
        assert count(conn, schema.products) == 3
        assert conn.execute(sa.select(schema.products.c.updated_at)).scalars().all()[:2] == first_update[:2]


def test_same_batch_twice_gives_one_row_per_product(tagged_db):
    ids = list(range(1, 21))
    predictions = synthetic_predictions(len(ids), seed=1, has_image=[i % 4 != 0 for i in ids])
    for _ in range(2):
        with tagged_db.begin() as conn:
            repository.write_tags_and_embeddings(conn, VERSION, "run-1", ids, predictions)
    with tagged_db.connect() as conn:
        assert count(conn, schema.tags) == count(conn, schema.embeddings) == 20
        image_less = conn.execute(sa.select(schema.tags.c.product_id)
                                  .where(schema.tags.c.has_image.is_(False))).scalars().all()
        heads = conn.execute(sa.select(schema.tags.c.heads).where(schema.tags.c.product_id == 1)).scalar_one()
        assert sorted(image_less) == [4, 8, 12, 16, 20]
        assert heads["articleType"]["label"] == predictions.labels["articleType"][0]
        assert stats_match_tags(conn, VERSION)
        assert untagged_product_ids(conn, VERSION) == list(range(21, 41))
        assert untagged_product_ids(conn, "other-version", limit=3) == [1, 2, 3]


def test_routed_tags_carry_their_review_status_and_each_run_counts_what_it_wrote(tagged_db):
    from fashion_tagging import dashboard

    ids = list(range(1, 11))
    predictions = synthetic_predictions(len(ids), seed=4)
    predictions.auto_accepted = {"articleType": np.arange(10) < 6, "season": np.arange(10) >= 8}
    for _ in range(2):  # a batch written twice by one run counts once
        with tagged_db.begin() as conn:
            repository.write_tags_and_embeddings(conn, VERSION, "run-a", ids, predictions)
    with tagged_db.begin() as conn:  # the same products again in a later run: the upsert path
        repository.write_tags_and_embeddings(conn, VERSION, "run-b", ids[:4], predictions.__class__(
            **{**predictions.__dict__, "labels": {h: v[:4] for h, v in predictions.labels.items()},
               "confidences": {h: v[:4] for h, v in predictions.confidences.items()},
               "top_k": {h: v[:4] for h, v in predictions.top_k.items()},
               "image_embeddings": predictions.image_embeddings[:4],
               "product_embeddings": predictions.product_embeddings[:4], "has_image": predictions.has_image[:4],
               "has_text": predictions.has_text[:4],
               "auto_accepted": {h: v[:4] for h, v in predictions.auto_accepted.items()}}))
    with tagged_db.connect() as conn:
        rows = dict(conn.execute(sa.select(schema.tags.c.product_id, schema.tags.c.review_status)).all())
        heads = dict(conn.execute(sa.select(schema.tags.c.product_id, schema.tags.c.heads)).all())
        runs = repository.run_tag_counts(conn, "run-a"), repository.run_tag_counts(conn, "run-b")
    assert [rows[i] for i in ids] == ["auto_accepted"] * 6 + ["needs_review"] * 4
    assert heads[9]["season"]["status"] == "auto_accepted" and heads[1]["season"]["status"] == "needs_review"
    assert "status" not in heads[1]["gender"]  # a head the model does not route
    assert sum(n for _, _, n in runs[0][VERSION]) == 10 and sum(n for _, _, n in runs[1][VERSION]) == 4

    report = {"run_id": "run-a", "model_version": VERSION, "products": 10, "category_js": 0.5, "category_psi": 3.0,
              "confidence_js": 0.01, "confidence_psi": 0.02, "threshold": 0.1, "alert": True,
              "details": {"verdict": "drift", "min_products": 5, "top_shifts": []}}
    for attempt in range(2):  # a retried check replaces its row
        with tagged_db.begin() as conn:
            repository.record_drift(conn, {**report, "category_js": 0.5 + attempt})
    with dashboard.read_only(tagged_db) as conn:
        history = dashboard.drift_history(conn)
    assert len(history) == 1 and history[0]["category_js"] == 1.5 and history[0]["alert"] is True
    assert history[0]["min_products"] == 5 and history[0]["verdict"] == "drift"


def test_write_killed_mid_transaction_then_retried(tagged_db, monkeypatch):
    ids = list(range(1, 31))
    predictions = synthetic_predictions(len(ids), seed=2)
    real_copy = repository._copy_encoded  # the fresh-rows path: COPY straight into the partitions
    calls = []

    def copy_then_die(conn, table, *args):
        calls.append(table)
        if len(calls) == 2:  # tags are already in; die while writing the embeddings
            raise ConnectionError("worker killed mid-batch")
        return real_copy(conn, table, *args)

    monkeypatch.setattr(repository, "_copy_encoded", copy_then_die)
    with pytest.raises(ConnectionError), tagged_db.begin() as conn:
        repository.write_tags_and_embeddings(conn, VERSION, "run-2", ids, predictions)
    with tagged_db.connect() as conn:
        assert count(conn, schema.tags) == 0  # nothing half-written

    with tagged_db.begin() as conn:  # the retry
        repository.write_tags_and_embeddings(conn, VERSION, "run-2", ids, predictions)
    with tagged_db.connect() as conn:
        assert count(conn, schema.tags) == count(conn, schema.embeddings) == 30


def test_both_write_paths_store_the_predicted_embeddings(tagged_db):
    ids = list(range(1, 11))
    predictions = synthetic_predictions(len(ids), seed=3)
    stored = []
    with tagged_db.begin() as conn:
        for _ in range(2):  # fresh rows (COPY into the partition), then the same rows again (the upsert)
            repository.write_tags_and_embeddings(conn, VERSION, "run-3", ids, predictions)
            stored.append(conn.execute(sa.select(schema.embeddings.c.product_embedding)
                                       .order_by("product_id")).scalars().all())
        assert count(conn, schema.tags) == 10
    for vectors in stored:
        np.testing.assert_allclose(np.array(vectors), predictions.product_embeddings, rtol=1e-6)


def test_errors_are_recorded_once_per_run(catalog_engine):
    errors = [RowError("corrupt image", 5, "images/5.jpg", "image"), RowError("missing product id", None, "m.csv#row3")]
    for _ in range(2):
        with catalog_engine.begin() as conn:
            repository.record_errors(conn, "run-a", errors)
    with catalog_engine.begin() as conn:
        repository.record_errors(conn, "run-b", errors[:1])
        rows = conn.execute(sa.select(schema.product_errors.c.run_id, schema.product_errors.c.stage)).all()
    assert sorted(rows) == [("run-a", "image"), ("run-a", "manifest"), ("run-b", "image")]


def test_model_registry_promotion_and_rejection(catalog_engine):
    for version, accuracy in (("v1", 0.91), ("v2", 0.93), ("v3", 0.80)):
        repository.register_model(catalog_engine, version, "efficientnet-lite0", 224, False,
                                  f"s3://bucket/models/{version}", {"accuracy": np.float32(accuracy)}, accuracy)
    assert repository.production_model(catalog_engine) is None
    repository.promote_model(catalog_engine, "v1")
    repository.promote_model(catalog_engine, "v2")
    repository.reject_model(catalog_engine, "v3", "accuracy 0.80 below the baseline 0.91")

    statuses = {version: repository.get_model(catalog_engine, version)["status"] for version in ("v1", "v2", "v3")}
    assert statuses == {"v1": "retired", "v2": "promoted", "v3": "rejected"}  # v1 superseded mid-backfill
    assert repository.production_model(catalog_engine)["version"] == "v2"
    assert repository.serving_model(catalog_engine) is None  # promoted is not serving
    with pytest.raises(ValueError, match="promoted"):
        repository.reject_model(catalog_engine, "v2", "no")
    with pytest.raises(repository.NotFound):
        repository.promote_model(catalog_engine, "v9")
    repository.activate_model(catalog_engine, "v2")
    assert repository.serving_model(catalog_engine)["version"] == "v2"
    with pytest.raises(sa.exc.IntegrityError), catalog_engine.begin() as conn:  # the database guards it too
        conn.execute(schema.model_versions.update().where(schema.model_versions.c.version == "v1")
                     .values(status="serving"))


def stats_match_tags(conn, version) -> bool:
    """tag_stats equal a count over tags (what the dashboard would otherwise scan)."""
    bins = repository.CONFIDENCE_BINS
    counted = conn.execute(sa.text(
        f"SELECT article_type, LEAST(width_bucket(article_type_confidence, 0.0, 1.0, {bins}), {bins}), count(*) "
        f"FROM tags WHERE model_version = :v GROUP BY 1, 2"), {"v": version}).all()
    kept = conn.execute(sa.text("SELECT article_type, confidence_bin, products FROM tag_stats "
                                "WHERE model_version = :v AND products <> 0"), {"v": version}).all()
    return sorted(map(tuple, counted)) == sorted(map(tuple, kept)) and len(kept) > 0


def test_tag_stats_follow_rewrites_and_retired_partitions_are_dropped(tagged_db):
    ids = list(range(1, 41))
    with tagged_db.begin() as conn:
        repository.write_tags_and_embeddings(conn, VERSION, "run-1", ids, synthetic_predictions(40, seed=1))
        repository.write_tags_and_embeddings(conn, VERSION, "run-2", ids[:25], synthetic_predictions(25, seed=9))
        assert stats_match_tags(conn, VERSION)
    repository.activate_model(tagged_db, VERSION)
    for version in ("v-next", "v-after"):  # each serves in turn; one retired version is kept for rollback
        repository.register_model(tagged_db, version, "efficientnet-lite0", 224, False, "file:///tmp/x", {}, 0.95)
        repository.promote_model(tagged_db, version)
        repository.write_tags_and_embeddings(tagged_db, version, "run-3", ids, synthetic_predictions(40, seed=3))
        dropped = repository.activate_model(tagged_db, version)["dropped_versions"]
    with tagged_db.connect() as conn:
        tables = set(conn.execute(sa.text("SELECT tablename FROM pg_tables")).scalars())
        stats_versions = set(conn.execute(sa.text("SELECT DISTINCT model_version FROM tag_stats")).scalars())
    assert dropped == [VERSION]
    assert repository.partition_name("tags", VERSION) not in tables
    assert {repository.partition_name("embeddings", v) for v in ("v-next", "v-after")} <= tables
    assert stats_versions == {"v-next", "v-after"}


def test_migration_from_0002_keeps_tags_and_serves_the_old_production_model(postgres_url):
    from alembic import command
    from alembic.config import Config

    from fashion_tagging.db.engine import MIGRATIONS_DIR

    url = new_database(postgres_url, migrated=False)
    try:
        engine = engine_for_url(url)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0002")
            conn.execute(sa.text("INSERT INTO products (product_id, title) SELECT g, 'p' || g FROM generate_series(1, 5) g"))
            conn.execute(sa.text("INSERT INTO model_versions (version, backbone, image_size, artifact_uri, status) "
                                 "VALUES ('old', 'efficientnet-lite0', 224, 'file:///x', 'production')"))
            conn.execute(sa.text("INSERT INTO tags (product_id, model_version, article_type, article_type_confidence, "
                                 "heads, has_image, has_text) SELECT g, 'old', 'Tshirts', 0.5, '{}', true, true "
                                 "FROM generate_series(1, 5) g"))
            conn.execute(sa.text("INSERT INTO embeddings (product_id, model_version, product_embedding) "
                                 "SELECT g, 'old', array_fill(0.1, ARRAY[256])::vector FROM generate_series(1, 5) g"))
        migrate(engine)
        with engine.connect() as conn:
            assert count(conn, schema.tags) == count(conn, schema.embeddings) == 5
            assert stats_match_tags(conn, "old")
            assert repository.serving_model(conn)["version"] == "old"
            assert repository.newest_change_seq(conn) == repository.serving_model(conn)["tagged_seq"] == 5
    finally:
        drop_database(postgres_url, url)


def test_similar_products_uses_the_hnsw_index(tagged_db):
    ids = list(range(1, 41))
    predictions = synthetic_predictions(len(ids), seed=4)
    centre = predictions.product_embeddings[0]
    for offset, i in enumerate(range(1, 4)):  # products 2 and 3 are near product 1
        vector = centre + 0.05 * (offset + 1) * predictions.product_embeddings[i]
        predictions.product_embeddings[i] = vector / np.linalg.norm(vector)
    repository.write_tags_and_embeddings(tagged_db, VERSION, "run-4", ids, predictions)
    with pytest.raises(repository.NotFound, match="no serving model"):  # promoted, still backfilling
        repository.similar_products(tagged_db, 1)
    repository.activate_model(tagged_db, VERSION)  # builds the partition's HNSW index after the load

    with tagged_db.begin() as conn:
        similar = repository.similar_products(conn, 1, k=5)
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):  # 40 rows: it would rather sort
            conn.exec_driver_sql(f"SET LOCAL {setting} = off")
        query = repository.similar_products_query(1, 5, VERSION).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {query}").scalars())
    assert [row[0] for row in similar[:3]] == [2, 3, 4]
    assert len(similar) == 5 and 1 not in [row[0] for row in similar]
    assert similar[0][1] == "Product 2" and similar[0][2] == predictions.labels["articleType"][1]
    assert [row[3] for row in similar] == sorted(row[3] for row in similar)
    assert f"{repository.partition_name('embeddings', VERSION)}_hnsw" in plan
    with pytest.raises(repository.NotFound):
        repository.similar_products(tagged_db, 999)


def test_manifests_load_once_unless_rewritten(catalog_engine, tmp_path):
    store = open_store(tmp_path.as_uri())
    store.put("catalog/a.csv", b"id,productDisplayName\n1,Shirt\nx,Bad\n2,Shoe\n")
    store.put("catalog/b.jsonl", b'{"id": 3, "productDisplayName": "Bag", "image_key": "images/3.jpg"}\n')
    first = load_catalog_into_db(catalog_engine, store, prefix="catalog/", run_id="night-1")
    second = load_catalog_into_db(catalog_engine, store, prefix="catalog/", run_id="night-2")
    store.put("catalog/b.jsonl", b'{"id": 3, "productDisplayName": "Bigger Bag"}\n{"id": 4, "productDisplayName": "Hat"}\n')
    third = load_catalog_into_db(catalog_engine, store, prefix="catalog/", run_id="night-3")

    assert (first.products_read, len(first.errors)) == (3, 1)
    assert second.manifest_keys == [] and second.products_read == 0  # nothing new: nothing re-read
    assert third.manifest_keys == ["catalog/b.jsonl"] and third.products_written == 2
    with catalog_engine.connect() as conn:
        titles = dict(conn.execute(sa.select(schema.products.c.product_id, schema.products.c.title)).all())
        assert count(conn, schema.product_errors) == 1
        ledger = dict(conn.execute(sa.select(schema.catalog_manifests.c.key, schema.catalog_manifests.c.errors)).all())
    assert titles == {1: "Shirt", 2: "Shoe", 3: "Bigger Bag", 4: "Hat"}
    assert ledger == {"catalog/a.csv": 1, "catalog/b.jsonl": 0}


def test_import_catalog_command_fills_store_and_database(catalog_settings, kaggle_slice):
    report = import_catalog(catalog_settings, kaggle_slice, manifest_format="csv", run_id="import-1")
    again = import_catalog(catalog_settings, kaggle_slice, manifest_format="csv", run_id="import-1")

    assert report["products"] == report["products_written"] == KAGGLE_SLICE_SIZE
    assert again["products_written"] == 0 and again["images_uploaded"] == 0
    with migrate_database(catalog_settings).connect() as conn:
        assert count(conn, schema.products) == KAGGLE_SLICE_SIZE
        assert count(conn, schema.product_errors) == KAGGLE_SLICE_BAD_ROWS == report["errors"]


def test_get_engine_starts_one_shared_embedded_server(tmp_path):
    settings = get_settings(home=tmp_path / "home", database_url=None)
    try:
        engine = get_engine(settings)
        migrate(engine)
        port = running_port(settings.pgdata_dir)
        other_process = subprocess.run(
            [sys.executable, "-c", "from fashion_tagging.db.engine import get_engine, running_port;"
             "from fashion_tagging.settings import get_settings; import sys;"
             f"s = get_settings(home=__import__('pathlib').Path({str(settings.home)!r}), database_url=None);"
             "get_engine(s).connect().close(); print(running_port(s.pgdata_dir))"],
            capture_output=True, text=True, check=True, timeout=120)
        assert int(other_process.stdout.strip()) == port
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "catalog"
    finally:
        stop_embedded_postgres(settings.pgdata_dir)
    assert running_port(settings.pgdata_dir) is None


def test_fast_row_encoding_sends_the_bytes_of_the_generic_copy(monkeypatch):
    """The backfill's hand-built COPY body equals the generic per-field encoder's, row for row."""
    predictions = synthetic_predictions(7, seed=5, has_image=[True, False, True, True, False, True, True])
    predictions.labels["articleType"][2] = 'Quote "and" ünïcode\\'
    # Routed heads carry a status (and articleType's is the row's review_status); the others none.
    predictions.auto_accepted = {"articleType": np.array([True, False, True, False, False, True, True]),
                                 "gender": np.array([False] * 6 + [True])}
    ids = [3, 1, 2**40, 5, 6, 7, 8]
    tag_rows, embedding_rows = tag_and_embedding_rows("v-é", "run \"x\"", ids, predictions)
    sent = {}

    class Cursor:
        def copy_expert(self, sql, buffer):
            sent[sql.split()[1]] = buffer.read()

        def close(self):
            pass

    conn = type("Conn", (), {"connection": type("Raw", (), {"cursor": lambda self: Cursor()})()})()
    repository.copy_rows(conn, "generic_tags", repository.TAG_COLUMNS, repository._TAG_TYPES, tag_rows)
    repository.copy_rows(conn, "generic_embeddings", repository.EMBEDDING_COLUMNS, repository._EMBEDDING_TYPES,
                         embedding_rows)
    tag_body, embedding_body = repository._encoded_rows("v-é", "run \"x\"", ids, predictions)
    repository._copy_encoded(conn, "tags", repository.TAG_COLUMNS, tag_body)
    repository._copy_encoded(conn, "embeddings", repository.EMBEDDING_COLUMNS, embedding_body)
    assert sent["tags"] == sent["generic_tags"] and sent["embeddings"] == sent["generic_embeddings"]


def test_a_version_promoted_again_plans_its_whole_backfill_again(tagged_db):
    def plan(version, run_id):
        target = repository.newest_change_seq(tagged_db)
        with tagged_db.begin() as conn:
            return repository.plan_tagging_batches(conn, version, run_id, target_seq=target, max_batches=4,
                                                   products_per_batch=15)

    first = plan(VERSION, "run-1")
    assert [b["products"] for b in first] == [15, 15, 10]  # 40 products, ranges of change_seq
    for batch in first:
        repository.finish_batch(tagged_db, batch["batch_id"])
    assert repository.advance_tagged_seq(tagged_db, VERSION) == repository.newest_change_seq(tagged_db)
    assert plan(VERSION, "run-2") == []  # nothing new
    repository.activate_model(tagged_db, VERSION, build_indexes=False)
    repository.register_model(tagged_db, "v-other", "efficientnet-lite0", 224, False, "file:///tmp/x", {}, 0.95)
    repository.promote_model(tagged_db, "v-other")
    repository.activate_model(tagged_db, "v-other", build_indexes=False)
    repository.promote_model(tagged_db, VERSION)  # a rollback to the retired version
    assert sum(b["products"] for b in plan(VERSION, "run-3")) == 40
