"""``tag_batch`` end to end: catalog in S3 (moto over HTTP) -> Postgres -> real tiny model -> tags."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fashion_tagging import pipeline
from fashion_tagging.db import repository, schema
from fashion_tagging.ingest import import_kaggle_catalog, load_catalog_into_db
from fashion_tagging.settings import get_settings
from fashion_tagging.tagging import load_production_tagger, tag_batch, tag_work_batch
from tests.fixtures_data import CORRUPT_IMAGE_ID
from tests.fixtures_services import untagged_product_ids

NO_INPUT_ID = 990001  # a product with neither photo nor text
UNKNOWN_ID = 990002  # not in the catalog at all


@pytest.fixture
def catalog(kaggle_slice, s3_store, catalog_engine, tiny_artifact, tmp_path):
    """The slice imported into S3 and Postgres, one photo deleted, the tiny model in production."""
    prefix = get_settings().models_prefix
    settings = get_settings(home=tmp_path / "home", database_url="unused", object_store_url=s3_store.url,
                            s3_endpoint_url=s3_store.endpoint_url, inference_batch_size=16)
    import_kaggle_catalog(kaggle_slice, s3_store)
    with catalog_engine.begin() as conn:
        load_catalog_into_db(conn, s3_store, prefix=settings.catalog_prefix, run_id="ingest")
        conn.execute(schema.products.insert().values(product_id=NO_INPUT_ID, title=None))
        with_photo = conn.execute(sa.select(schema.products.c.product_id, schema.products.c.image_key)
                                  .where(schema.products.c.image_key.is_not(None),
                                         schema.products.c.product_id != CORRUPT_IMAGE_ID)
                                  .order_by("product_id")).all()
    missing_photo_id, missing_key = with_photo[0]
    s3_store.client.delete_object(Bucket=s3_store.bucket, Key=missing_key)

    version = tiny_artifact.name
    s3_store.upload_dir(tiny_artifact, f"{prefix}{version}")
    repository.register_model(catalog_engine, version, "efficientnet-lite0", 64, False,
                              s3_store.uri(f"{prefix}{version}"), {}, None)
    repository.promote_model(catalog_engine, version)
    with catalog_engine.connect() as conn:
        ids = untagged_product_ids(conn, version)
    return dict(settings=settings, engine=catalog_engine, store=s3_store, version=version, ids=ids,
                missing_photo_id=missing_photo_id, artifact_uri=s3_store.uri(f"{prefix}{version}"))


def test_tag_batch_records_bad_inputs_and_is_safe_to_repeat(catalog):
    engine, ids = catalog["engine"], catalog["ids"] + [UNKNOWN_ID]
    run = dict(settings=catalog["settings"], engine=engine, store=catalog["store"], run_id="nightly-1")

    first = tag_batch(ids, **run)  # resolves the production model from the registry, via S3
    second = tag_batch(ids, **run)

    untaggable = {NO_INPUT_ID, UNKNOWN_ID}
    assert first.tagged == second.tagged == len(ids) - len(untaggable)
    assert first.model_version == catalog["version"]
    with engine.connect() as conn:
        tags = {row.product_id: row for row in conn.execute(sa.select(schema.tags))}
        errors = {(row.product_id, row.stage): row.reason for row in conn.execute(sa.select(schema.product_errors)
                                                                                 .where(schema.product_errors.c.run_id == "nightly-1"))}
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar() == len(tags)
        similar = repository.similar_products(conn, ids[0], k=3, model_version=catalog["version"])
    assert set(tags) == set(ids) - untaggable
    assert not tags[CORRUPT_IMAGE_ID].has_image and tags[CORRUPT_IMAGE_ID].has_text
    assert not tags[catalog["missing_photo_id"]].has_image
    assert sum(tag.has_image for tag in tags.values()) == len(tags) - 1 - 1 - 3  # corrupt, deleted, 3 image-less
    assert "cannot decode" in errors[(CORRUPT_IMAGE_ID, "image")]
    assert "missing" in errors[(catalog["missing_photo_id"], "image")]
    assert "no usable image and no text" in errors[(NO_INPUT_ID, "inference")]
    assert "not in the catalog" in errors[(UNKNOWN_ID, "inference")]
    assert len(errors) == first.errors == second.errors == 4  # a repeat records nothing twice
    tagger = load_production_tagger(catalog["settings"], engine)
    assert {tag.article_type for tag in tags.values()} <= set(tagger.label_maps["articleType"].labels)
    assert len(similar) == 3
    assert first.as_dict()["products_per_second"] > 0 and first.fetch_seconds >= 0

    # Training fitted a calibration on val: every tag is routed by it, per head and for the row.
    calibration = tagger.calibration
    assert set(calibration["heads"]) == set(tagger.heads)
    assert calibration["heads"]["articleType"]["target_precision"] == 0.99
    assert {tag.review_status for tag in tags.values()} <= {"auto_accepted", "needs_review"}
    for tag in tags.values():
        threshold = calibration["heads"]["articleType"]["threshold"]
        accepted = threshold is not None and tag.article_type_confidence >= threshold
        assert tag.review_status == ("auto_accepted" if accepted else "needs_review")
        assert {head["status"] for head in tag.heads.values()} <= {"auto_accepted", "needs_review"}
    with engine.connect() as conn:  # the run's own counts (for its drift check), written once per product
        counted = repository.run_tag_counts(conn, "nightly-1")[catalog["version"]]
    assert sum(n for _, _, n in counted) == first.tagged  # the repeat in the same run counted once


def test_a_batch_of_one_type_raises_a_drift_alert(catalog, monkeypatch):
    """A synthetic shift: a night of sports shoes only (text-only products titled like the training
    slice's sports shoes, so even the tiny model knows them) against a model whose training catalog
    is 70 % t-shirts. The alert is stored, logged and sent to the configured callback."""
    import pandas as pd

    from fashion_tagging import drift
    from tests.fixtures_data import DATA_DIR, slice_ids

    styles = pd.read_csv(DATA_DIR / "styles.csv", usecols=["id", "articleType", "productDisplayName"],
                         on_bad_lines="skip")
    titles = styles[(styles["articleType"] == "Sports Shoes") & styles["id"].isin(slice_ids())]["productDisplayName"]
    titles = (titles.tolist() * 120)[:120]
    frame = pd.DataFrame({"id": [900000 + i for i in range(120)], "articleType": "Sports Shoes",
                          "productDisplayName": titles})
    repository.upsert_products(catalog["engine"], frame)
    alerts = []
    monkeypatch.setattr(drift, "_test_alerts", alerts.append, raising=False)
    # A low bar: the tiny model's val split (its confidence reference) is far under the default 100.
    settings = pipeline_settings(catalog, drift_min_products=20,
                                 drift_alert_callback="fashion_tagging.drift:_test_alerts")
    tag_batch(frame["id"].tolist(), settings=settings, engine=catalog["engine"], store=catalog["store"],
              run_id="shoe-night")
    result = pipeline.check_tagging_drift(settings, {"run_id": "shoe-night"})
    assert result["alert"] is True and len(alerts) == 1
    report = result["reports"][0]
    assert report["model_version"] == catalog["version"] and report["products"] == 120
    assert max(report["category_js"], report["confidence_js"]) > settings.drift_threshold
    with catalog["engine"].connect() as conn:
        stored = conn.execute(sa.select(schema.tagging_drift)).one()
    assert stored.alert and stored.run_id == "shoe-night" and stored.details["top_shifts"]
    assert pipeline.check_tagging_drift(settings, {"run_id": "shoe-night"})["alert"]  # a retried check: one row
    with catalog["engine"].connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.tagging_drift)).scalar() == 1


def test_batch_killed_while_writing_is_retried_cleanly(catalog, monkeypatch):
    engine, ids = catalog["engine"], catalog["ids"][:8]
    run = dict(settings=catalog["settings"], engine=engine, store=catalog["store"], run_id="nightly-2")
    real_copy = repository._copy_encoded  # new rows: COPYed straight into the version's partitions
    calls = []

    def die_on_embeddings(conn, table, *args):
        calls.append(table)
        if "embeddings" in table and len(calls) < 3:
            raise ConnectionError("worker lost mid-transaction")
        return real_copy(conn, table, *args)

    monkeypatch.setattr(repository, "_copy_encoded", die_on_embeddings)
    with pytest.raises(ConnectionError):
        tag_batch(ids, **run)
    result = tag_batch(ids, **run)

    with engine.connect() as conn:
        tag_ids = conn.execute(sa.select(schema.tags.c.product_id)).scalars().all()
        embedding_count = conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar()
    assert sorted(tag_ids) == sorted(ids) and embedding_count == len(ids) == result.tagged


# --- the nightly DAG's steps (discover -> plan -> tag_work_batch per descriptor -> finish) -------------


def pipeline_settings(catalog, **overrides):
    url = catalog["engine"].url.render_as_string(hide_password=False)
    return catalog["settings"].replace(database_url=url, **overrides)


def nightly_run(settings, run_id, *, fail=lambda batch: False):
    """What the DAG does, task by task; a batch for which ``fail`` is true fails twice (retries spent)."""
    discovered = pipeline.discover_tagging_work(settings, run_id)
    descriptors = pipeline.plan_tagging_run(settings, discovered)
    for batch in descriptors:
        for _ in range(2 if fail(batch) else 1):
            try:
                tag_work_batch(batch["batch_id"], settings=settings, run_id=run_id)
            except RuntimeError:
                pass
    return descriptors, pipeline.finish_tagging_run(settings, discovered)


def tag_rows(engine, version):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.tags.c.product_id).where(schema.tags.c.model_version == version)
                            ).scalars().all()


def test_capped_runs_tag_every_product_once_and_a_promoted_model_serves_only_when_complete(catalog):
    settings = pipeline_settings(catalog, tagging_batch_size=2, tagging_task_min_products=1, tagging_task_max_products=2, tagging_max_tasks=3)
    engine, version = catalog["engine"], catalog["version"]
    taggable = set(catalog["ids"]) - {NO_INPUT_ID}
    runs = []
    while not runs or runs[-1][1]["more_work"]:
        assert repository.serving_model(engine) is None  # promoted, not served before it covers the catalog
        runs.append(nightly_run(settings, f"night-{len(runs)}"))
        assert len(runs) < 20
    assert all(len(descriptors) <= 3 for descriptors, _ in runs)
    assert len(runs) == -(-len(catalog["ids"]) // 6)  # 3 tasks x 2 products a run, nothing planned twice
    assert runs[-1][1]["activated"]["version"] == version and runs[-1][1]["status"] == "success"
    assert sorted(tag_rows(engine, version)) == sorted(taggable)  # each exactly once
    assert repository.serving_model(engine)["version"] == version
    quiet_descriptors, quiet = nightly_run(settings, "quiet-night")
    assert quiet_descriptors == [] and quiet["nothing_to_do"] == "nothing new to tag"

    # A second promotion: the first model keeps serving (and tagging arrivals) until the second covers all.
    repository.register_model(engine, "v-next", "efficientnet-lite0", 64, False, catalog["artifact_uri"], {}, None)
    repository.promote_model(engine, "v-next")
    with engine.begin() as conn:
        conn.execute(schema.products.insert().values(product_id=990100, title="Blue denim shirt for men"))
    descriptors, first = nightly_run(settings, "after-promotion")
    assert [d["model_version"] for d in descriptors][0] == version  # serving first: the arrival stays visible
    assert 990100 in tag_rows(engine, version) and repository.serving_model(engine)["version"] == version
    assert repository.similar_products(engine, 990100, k=2)  # readers still on the serving version
    while first["more_work"]:
        _, first = nightly_run(settings, f"backfill-{first['run_id']}")
    assert repository.serving_model(engine)["version"] == "v-next"
    assert sorted(tag_rows(engine, "v-next")) == sorted(taggable | {990100})
    assert repository.get_model(engine, version)["status"] == "retired"


def test_failed_batch_fails_the_run_by_name_and_the_next_run_tags_only_what_is_left(catalog, monkeypatch):
    settings = pipeline_settings(catalog, tagging_batch_size=5, tagging_task_min_products=1, tagging_task_max_products=5, tagging_max_tasks=10)
    engine, version = catalog["engine"], catalog["version"]
    real_write = repository.write_tags_and_embeddings
    doomed = sorted(catalog["ids"])[7]

    def write_unless_doomed(conn, model_version, run_id, product_ids, predictions):
        if doomed in product_ids:
            raise RuntimeError("disk full while writing the batch")
        return real_write(conn, model_version, run_id, product_ids, predictions)

    monkeypatch.setattr(repository, "write_tags_and_embeddings", write_unless_doomed)
    descriptors, failed_run = nightly_run(settings, "night-1", fail=lambda batch: True)
    assert failed_run["status"] == "failed" and len(failed_run["failed_batches"]) == 1
    failed = failed_run["failed_batches"][0]
    assert "disk full" in failed["error"] and failed["batch_id"] in [d["batch_id"] for d in descriptors]
    with engine.connect() as conn:
        run_row = conn.execute(sa.select(schema.tagging_runs).where(schema.tagging_runs.c.run_id == "night-1")).one()
    assert run_row.status == "failed" and run_row.details["failed_batches"][0]["batch_id"] == failed["batch_id"]
    tagged_before = len(tag_rows(engine, version))
    assert repository.serving_model(engine) is None

    monkeypatch.setattr(repository, "write_tags_and_embeddings", real_write)
    descriptors, retry = nightly_run(settings, "night-2")
    assert [d["batch_id"] for d in descriptors] == [failed["batch_id"]]  # exactly what was left
    assert retry["status"] == "success" and retry["products_tagged"] + tagged_before == len(tag_rows(engine, version))
    assert sorted(tag_rows(engine, version)) == sorted(set(catalog["ids"]) - {NO_INPUT_ID})  # no duplicates
    assert retry["activated"]["version"] == version
