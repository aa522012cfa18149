"""Real S3 faults between ``S3Store`` and moto's HTTP server: 503 SlowDown, 500, connection resets,
read timeouts and bodies cut off mid-read, injected by ``tests/s3_fault_proxy.py``.

Retries are botocore's (the store's ``Config``); every test checks how many were needed, through
``S3Store.retry_counts`` (per operation), against the faults the proxy says it injected. The
tagging test drives the branch "photo fetch failed -> recorded, product queued again, not lost".
"""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from fashion_tagging import pipeline
from fashion_tagging.db import schema
from fashion_tagging.objectstore import ObjectNotFound, S3Store
from fashion_tagging.tagging import tag_work_batch
from tests import test_tagging
from tests.fixtures_data import CORRUPT_IMAGE_ID
from tests.s3_fault_proxy import S3FaultProxy

catalog = test_tagging.catalog  # fixture: the slice in S3 and Postgres, the tiny model promoted

FAULT_READ_TIMEOUT_S = 1.0  # the faulty stores' read timeout: a "timeout" fault costs 1 s per attempt
TRANSIENT = ("slowdown", "internal", "reset", "timeout")
FAULTS_PER_CALL = 2  # fewer than the default budget (8 attempts): every call must get through


@pytest.fixture
def proxy(s3_endpoint):
    with S3FaultProxy(s3_endpoint, seed=14, stall_s=3 * FAULT_READ_TIMEOUT_S) as proxy:
        yield proxy


def faulty_store(proxy: S3FaultProxy, bucket: str, **overrides) -> S3Store:
    """A store that talks to S3 through the proxy, with the production retry config unless overridden."""
    return S3Store(bucket, endpoint_url=proxy.url, read_timeout=FAULT_READ_TIMEOUT_S, **overrides)


@pytest.mark.parametrize("kind", TRANSIENT)
def test_get_list_put_head_survive_transient_faults_and_count_each_retry(kind, proxy, s3_store):
    s3_store.put("photos/1.jpg", b"jpeg bytes")  # straight to moto
    store = faulty_store(proxy, s3_store.bucket)
    for method, key in [("GET", r"^photos/1\.jpg$"), ("LIST", r"^photos/$"), ("PUT", r"^photos/2\.jpg$"),
                        ("HEAD", r"^photos/2\.jpg$")]:
        proxy.inject(kind, method=method, key_pattern=key, times=FAULTS_PER_CALL)

    assert store.get("photos/1.jpg") == b"jpeg bytes"
    assert store.list_keys("photos/") == ["photos/1.jpg"]
    store.put("photos/2.jpg", b"new photo")
    assert store.fingerprint("photos/2.jpg") == s3_store.fingerprint("photos/2.jpg")  # HEAD

    assert s3_store.get("photos/2.jpg") == b"new photo"  # the retried PUT arrived, once and whole
    stats = proxy.stats
    assert stats.faults == {kind: 4 * FAULTS_PER_CALL}
    assert stats.requests == {op: FAULTS_PER_CALL + 1 for op in ("GET", "LIST", "PUT", "HEAD")}
    assert store.retry_counts == {op: FAULTS_PER_CALL for op in ("GetObject", "ListObjectsV2", "PutObject",
                                                                  "HeadObject")}
    assert store.retries == stats.faults[kind]  # one retry per injected fault, no more


def test_a_body_cut_off_mid_read_resumes_where_it_stopped(proxy, s3_store):
    payload = os.urandom(256 * 1024)
    s3_store.put("photos/big.jpg", payload)
    store = faulty_store(proxy, s3_store.bucket)
    proxy.inject("truncate", method="GET", times=FAULTS_PER_CALL)

    assert store.get("photos/big.jpg") == payload
    with store.open("photos/big.jpg") as handle:  # the streamed read (manifests, artifacts) too
        assert handle.read() == payload

    assert proxy.stats.faults == {"truncate": FAULTS_PER_CALL}
    assert store.retry_counts == {"resumed_reads": FAULTS_PER_CALL}  # ranged GETs, pinned to the ETag
    assert proxy.stats.requests == {"GET": FAULTS_PER_CALL + 2}  # + the good read of each call


@pytest.mark.parametrize("kind, error, message", [
    ("slowdown", ClientError, r"\(SlowDown\) when calling the GetObject operation \(reached max retries: 2\)"),
    ("internal", ClientError, r"\(InternalError\) when calling the GetObject operation \(reached max retries: 2\)"),
    ("reset", ConnectionClosedError, r"Connection was closed before we received a valid response"),
    ("timeout", ReadTimeoutError, r"Read timeout on endpoint URL"),
])
def test_a_fault_that_outlasts_the_retry_budget_raises_a_clear_error(kind, error, message, proxy, s3_store):
    s3_store.put("photos/1.jpg", b"jpeg bytes")
    store = faulty_store(proxy, s3_store.bucket, max_attempts=3)
    proxy.inject(kind, method="GET", key_pattern=r"^photos/1\.jpg$", times=None)

    with pytest.raises(error, match=message) as raised:
        store.get("photos/1.jpg")
    if error is not ClientError:  # connection errors name the URL, S3 errors their code and operation
        assert f"{s3_store.bucket}/photos/1.jpg" in str(raised.value)
    assert not isinstance(raised.value, ObjectNotFound)  # a fault is never mistaken for a missing photo

    assert proxy.stats.faults == {kind: 3}  # every attempt faulted
    assert store.retry_counts == {"GetObject": 2}  # the budget: 3 attempts = 2 retries
    proxy.clear()
    assert store.get("photos/1.jpg") == b"jpeg bytes"  # the fault cleared: the same store reads again


# --- the tagging branch: photo fetch failed -> recorded, queued again, tagged by a later run ---------


def nightly_run(settings, run_id: str, store: S3Store) -> dict:
    """The nightly DAG's steps, with every tagging task reading photos through ``store``."""
    discovered = pipeline.discover_tagging_work(settings, run_id)
    for batch in pipeline.plan_tagging_run(settings, discovered):
        tag_work_batch(batch["batch_id"], settings=settings, run_id=run_id, store=store)
    return pipeline.finish_tagging_run(settings, discovered)


def test_photos_that_keep_failing_are_recorded_requeued_and_tagged_once_the_fault_clears(catalog, proxy):
    settings = test_tagging.pipeline_settings(catalog, tagging_batch_size=8, tagging_task_min_products=1, tagging_task_max_products=8,
                                              tagging_max_tasks=10)
    engine, version = catalog["engine"], catalog["version"]
    products = schema.products
    with engine.connect() as conn:
        with_photo = conn.execute(sa.select(products.c.product_id, products.c.image_key, products.c.change_seq)
                                  .where(products.c.image_key.is_not(None),
                                         products.c.product_id.not_in([CORRUPT_IMAGE_ID, catalog["missing_photo_id"]]))
                                  .order_by(products.c.product_id)).all()
    kinds = ("internal", "reset", "timeout")  # one photo per kind, each failing on every attempt
    doomed = {row.product_id: (kind, row.image_key, row.change_seq) for kind, row in zip(kinds, with_photo[3:])}
    for kind, image_key, _ in doomed.values():
        proxy.inject(kind, method="GET", key_pattern=f"^{re.escape(image_key)}$", times=None)
    store = faulty_store(proxy, catalog["store"].bucket, max_attempts=3)
    taggable = set(catalog["ids"]) - {test_tagging.NO_INPUT_ID}

    first = nightly_run(settings, "faulty-night", store)

    assert first["status"] == "success" and first["products_tagged"] == len(taggable) - len(doomed)
    assert set(test_tagging.tag_rows(engine, version)) == taggable - set(doomed)
    with engine.connect() as conn:
        errors = {row.product_id: row for row in conn.execute(
            sa.select(schema.product_errors).where(schema.product_errors.c.run_id == "faulty-night",
                                                   schema.product_errors.c.product_id.in_(list(doomed))))}
        requeued = dict(conn.execute(sa.select(products.c.product_id, products.c.change_seq)
                                     .where(products.c.product_id.in_(list(doomed)))).all())
    assert set(errors) == set(doomed)
    expected_cause = {"internal": "InternalError", "reset": "Connection was closed", "timeout": "Read timeout"}
    for product_id, (kind, image_key, change_seq) in doomed.items():
        error = errors[product_id]
        assert (error.stage, error.source) == ("image", image_key)
        assert "image fetch failed, product not tagged (queued again)" in error.reason
        assert expected_cause[kind] in error.reason
        assert requeued[product_id] > max(change_seq, int(first["versions"][version]["tagged_seq"]))
    assert proxy.stats.faults == {kind: 3 for kind in kinds}  # 3 attempts each: the budget, then recorded
    assert store.retry_counts == {"GetObject": 2 * len(doomed)}

    proxy.clear()
    proxy.reset_stats()
    second = nightly_run(settings, "night-after", store)

    assert second["status"] == "success" and second["products_tagged"] == len(doomed)  # exactly what was left
    assert proxy.stats.requests == {"GET": len(doomed)} and not proxy.stats.faults
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.tags.c.product_id, schema.tags.c.has_image)
                            .where(schema.tags.c.model_version == version)).all()
        second_errors = conn.execute(sa.select(sa.func.count()).select_from(schema.product_errors)
                                     .where(schema.product_errors.c.run_id == "night-after")).scalar()
    assert sorted(row.product_id for row in rows) == sorted(taggable)  # nothing lost, one row per product
    assert all(row.has_image for row in rows if row.product_id in doomed) and second_errors == 0
    assert store.retry_counts == {"GetObject": 2 * len(doomed)}  # no retries needed the second night
