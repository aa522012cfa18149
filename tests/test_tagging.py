"""``tag_batch`` end to end: catalog in S3 (moto over HTTP) -> Postgres -> real tiny model -> tags."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fashion_tagging.db import repository, schema
from fashion_tagging.ingest import import_kaggle_catalog, load_catalog_into_db
from fashion_tagging.settings import get_settings
from fashion_tagging.tagging import load_production_tagger, tag_batch
from tests.fixtures_data import CORRUPT_IMAGE_ID

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
        ids = repository.products_needing_tags(conn, version)
    return dict(settings=settings, engine=catalog_engine, store=s3_store, version=version, ids=ids,
                missing_photo_id=missing_photo_id)


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
        similar = repository.similar_products(conn, ids[0], k=3)
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


def test_batch_killed_while_writing_is_retried_cleanly(catalog, monkeypatch):
    engine, ids = catalog["engine"], catalog["ids"][:8]
    run = dict(settings=catalog["settings"], engine=engine, store=catalog["store"], run_id="nightly-2")
    real_copy = repository.copy_rows
    calls = []

    def die_on_embeddings(conn, table, *args):
        calls.append(table)
        if "embeddings" in table and len(calls) < 3:
            raise ConnectionError("worker lost mid-transaction")
        return real_copy(conn, table, *args)

    monkeypatch.setattr(repository, "copy_rows", die_on_embeddings)
    with pytest.raises(ConnectionError):
        tag_batch(ids, **run)
    result = tag_batch(ids, **run)

    with engine.connect() as conn:
        tag_ids = conn.execute(sa.select(schema.tags.c.product_id)).scalars().all()
        embedding_count = conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar()
    assert sorted(tag_ids) == sorted(ids) and embedding_count == len(ids) == result.tagged
